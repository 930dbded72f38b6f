"""Hugging Face folders from training checkpoints: ``tokenizer`` (the data's tokenizer as a
transformers tokenizer) and ``export`` (the model, its config and tokenizer written with
``save_pretrained``). The weight mapping itself is ``muonq.models.hf``; the command line is
``python -m muonq.export``."""
