"""Serving many videos with warm networks, over the Python API (`xtalker.api.XTalker`).

- `batch`: `xtalker batch LIST` -- a CSV or JSONL list (source, audio, output, per-video options) in, one mp4 per
  line out, one model load, failed lines reported and skipped, a summary at the end.
- `ui`: `xtalker-ui` / `python app.py` -- a Gradio page (and its `/generate` HTTP API) over one XTalker; needs the
  `ui` extra.
- `doctor`: `xtalker doctor` -- what this machine has and can do (versions, CPU features, checkpoints, int8, the
  encoder), optionally a quick measured test and a recommended preset.
"""
