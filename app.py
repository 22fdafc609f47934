"""Serve trained models in a web page: `python app.py --help`."""

from thyroid_classifier.app import main

if __name__ == "__main__":
    raise SystemExit(main())
