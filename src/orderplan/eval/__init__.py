"""Evaluating policies: the held-out report (`report`), teacher-forced and generation rollouts
(`rollouts`), the evaluate run (`run`, `scripts/evaluate.py`), plots (`plots`), FID/KID and the
noise floor (`fid`), the feature networks behind them (`feature_net`) and the digit classifier's
training (`classifier_training`, `scripts/train_classifier.py`)."""
