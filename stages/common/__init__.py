"""Code several stages share (the CLIP model loader, dedup machinery, the
safe HTTP client, the resizer). Stages import these modules, never each other."""
