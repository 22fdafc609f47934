"""Serve trained models in a web page: `python app.py --help`.

`python app.py` parses the command line; `gradio app.py` (auto-reload) and a Hugging Face Space import
this file and serve its module-level `demo`, built from $MODEL_ID (model folders or Hub ids) or the
quick start's folder. $GRADIO_SERVER_NAME / $GRADIO_SERVER_PORT are honoured; locally the app binds 127.0.0.1.
"""

from thyroid_classifier.app import main, module_demo

if __name__ == "__main__":
    raise SystemExit(main())

demo = module_demo()
