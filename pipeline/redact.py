"""Secrets out of what is stored and logged: the config in every checkpoint and the wandb run config.

Checkpoints travel (a colleague, a model download) and wandb projects are shared, so neither may
carry a token. What counts as one here:

- every value of `slurm.env` (it exists to hand the job tokens: WANDB_API_KEY, HF_TOKEN, ...);
- the user:password part of a URL anywhere in a string (`https://user:pw@host/...`, also inside
  a `pipe:` command);
- URL query parameters that carry credentials (presigned S3 / GCS / Azure URLs: X-Amz-Signature,
  X-Amz-Credential, sig, token, ...).

The run folder's config.yaml and job script keep the real values (a requeued job needs them) and
are written readable by their owner only when they hold any (docs/trust.md).
"""

from __future__ import annotations

import re

REDACTED = "<redacted>"
# greedy to the authority's last '@': a password may hold one (user:p@ss@host)
_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s'\"]+@")
_SECRET_PARAM = re.compile(
    r"(?i)([?&](?:x-amz-[a-z-]+|x-goog-[a-z-]+|sig|signature|token|access_token|api_key|apikey|key|secret|password|"
    r"passwd|pwd|credential|auth|sv|se|sp|skoid|sktid)=)[^&#\s'\"]+")


def redact_text(text: str) -> str:
    """`text` with URL credentials replaced by <redacted>."""
    return _SECRET_PARAM.sub(rf"\1{REDACTED}", _USERINFO.sub(rf"\1{REDACTED}@", text))


def redact(tree, path: str = ""):
    """A copy of a plain config tree (dicts, lists, scalars) with the secrets above replaced."""
    if path == "slurm.env" or path.startswith("slurm.env."):  # nested, or a flattened key
        return {key: REDACTED for key in tree} if isinstance(tree, dict) else REDACTED
    if isinstance(tree, dict):
        return {key: redact(value, f"{path}.{key}" if path else str(key)) for key, value in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(redact(value, path) for value in tree)
    if isinstance(tree, str):
        return redact_text(tree)
    return tree


def redact_argv(argv: list[str]) -> list[str]:
    """A command line with `slurm.env.KEY=value` overrides and URL credentials redacted."""
    return [f"{a.split('=', 1)[0]}={REDACTED}" if a.startswith(("slurm.env.", "slurm.env=")) and "=" in a
            else redact_text(a) for a in argv]


def holds_secrets(tree) -> bool:
    return redact(tree) != tree
