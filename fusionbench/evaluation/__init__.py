"""Evaluators: multimodal exact match per question type, text-only forgetting suite."""
