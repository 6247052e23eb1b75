"""Token-level guidance (Q♯ and the CD baseline) inside vLLM: one offset core
(`offsets`), an in-worker value model with per-request KV cache (`worker_model`), the shared
step (`guide`), and the V1 / MRV2 logits-processor adapters (`v1_processor`,
`mrv2_processor`, `processor`). See docs/guidance.md."""
