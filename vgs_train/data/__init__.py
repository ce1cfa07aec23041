"""The bottom layer with ``vgs_train.config``: rows of image-question-answer data, the synthetic task, the offline
tokenizer, answer checking and rewards, seeded RNG helpers. No model code."""
