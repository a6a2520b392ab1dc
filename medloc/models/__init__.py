"""Model loading (policy, reference, processor) and the tiny offline Qwen2.5-VL builder."""
