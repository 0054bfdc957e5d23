"""Pretrained weights named by a Hugging Face Hub repo id (e.g. ``nvidia/mit-b3``) or a local file.

``model.pretrained`` is resolved here to a local file: an existing path as it is; otherwise a Hub repo id, whose
weights file is fetched by ``huggingface_hub.hf_hub_download`` into the library's own cache (``HF_HOME`` /
``HF_HUB_CACHE``, shared with every other Hugging Face tool), pinned to ``model.pretrained_revision`` (a branch,
tag or commit; None: ``main``) and read from the cache without a request under ``HF_HUB_OFFLINE=1``. A repo's
``model.safetensors`` is preferred (no pickle at all); ``pytorch_model.bin`` is the fallback, read by
:mod:`diffseg_jax.torchfile`, which executes nothing. With no network and nothing cached the error names the
repo and how to pass a file instead.
"""

from __future__ import annotations

import os
import re

# The files a transformers repo keeps its weights in, in the order they are tried.
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


class HubUnavailableError(FileNotFoundError):
    """A Hub repo's weights that are neither cached nor downloadable now; the message says what to do."""


def requested(spec: str | None) -> str | None:
    """``spec`` unless it means "no pretrained weights": None, '' or 'None' (what ``--config.model.pretrained=None``
    gives, the flag parser passing the text of a string setting as it is)."""
    if spec is None or str(spec).strip().lower() in ("", "none"):
        return None
    return str(spec)


def is_repo_id(spec: str) -> bool:
    """Whether ``spec`` reads as ``owner/name`` and is not an existing local path."""
    return bool(_REPO_ID.match(spec)) and not os.path.exists(os.path.expanduser(spec))


def _offline_help(repo_id: str, revision: str | None) -> str:
    rev = f" --revision {revision}" if revision else ""
    return (
        f"Either run once with network access (the file is then cached under HF_HOME, ~/.cache/huggingface by "
        f"default, and found offline), or fetch it elsewhere, e.g. `hf download {repo_id} model.safetensors{rev}` "
        f"(or pytorch_model.bin), copy it here and pass --config.model.pretrained=/path/to/model.safetensors; "
        "or set --config.model.pretrained=None to start from random weights."
    )


def resolve(spec: str, revision: str | None = None, cache_dir: str | None = None) -> str:
    """A local weights file for ``spec``: a path (``~`` expanded) as it is, or a Hub repo's weights file
    through ``hf_hub_download`` (cached; ``HF_HUB_OFFLINE=1`` reads the cache only)."""
    path = os.path.expanduser(spec)
    if os.path.exists(path):
        return path
    if not _REPO_ID.match(spec):
        raise FileNotFoundError(
            f"model.pretrained={spec!r} is neither an existing file nor a Hugging Face Hub repo id (owner/name, "
            "e.g. nvidia/mit-b3)."
        )
    from huggingface_hub import errors, hf_hub_download  # noqa: PLC0415 — only runs that name a repo need it

    not_cached = []
    for filename in WEIGHT_FILES:
        try:
            return hf_hub_download(spec, filename, revision=revision, cache_dir=cache_dir)
        except errors.LocalEntryNotFoundError as e:  # offline (or no connection) and not in the cache
            not_cached.append(f"{filename}: {e}".split("\n")[0])
        except (errors.RepositoryNotFoundError, errors.GatedRepoError) as e:
            raise HubUnavailableError(
                f"model.pretrained={spec!r}: the Hub has no public repo of that name ({type(e).__name__}). Check "
                "the id (e.g. nvidia/mit-b3), log in for a gated repo (hf auth login), or pass a local file."
            ) from None
        except errors.RevisionNotFoundError:
            raise HubUnavailableError(
                f"model.pretrained_revision={revision!r} is not a branch, tag or commit of {spec}."
            ) from None
        except errors.EntryNotFoundError:  # the repo has no such file: try the next one
            continue
    if not_cached:
        from huggingface_hub import constants  # noqa: PLC0415

        why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the Hub cannot be reached"
        raise HubUnavailableError(
            f"model.pretrained={spec!r}{f' (revision {revision})' if revision else ''}: {why} and the weights are "
            f"not in the Hugging Face cache (tried {', '.join(WEIGHT_FILES)}). {_offline_help(spec, revision)}"
        )
    raise HubUnavailableError(
        f"The Hub repo {spec} has none of {WEIGHT_FILES}: it is not a transformers checkpoint this code reads. "
        "Pass a local .safetensors/.bin/.npz file instead."
    )
