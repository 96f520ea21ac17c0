"""Tasks: what the one training loop (semvlp.train) needs to know about pre-training or a fine-tuning task."""
