"""Supervised fine-tuning (MobiLlama-Chat): conversation formats, assistant-only label masks, demo data."""
