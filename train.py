"""Train and compare thyroid ultrasound classifiers: `python train.py --help`."""

from thyroid_classifier.training import main

if __name__ == "__main__":
    raise SystemExit(main())
