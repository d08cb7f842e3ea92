"""QA synthesis: documents -> a teacher -> filtered question-answer pairs for fine-tuning and strict evaluation."""
