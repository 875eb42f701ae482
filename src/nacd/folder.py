"""What a run folder says it holds, against the config a command was given.

The stages refuse a contradiction through their manifests (:func:`nacd.artifacts.check_identity`); the
commands that only read a folder (``nacd report``, ``inspect``, ``export``) call :func:`guard` first, so a
config that names another distilling model, corpus or selection is refused, naming the field and both
values, before anything is written: a report never labels one model's results with another's role.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nacd.artifacts import RunDir, first_difference, read_manifest, short_repr
from nacd.errors import NacdError

#: Config fields that define what a run folder holds (the roles of its models, its corpus, its selection).
IDENTITY_FIELDS = ("model.spec", "data.sources", "data.heldout", "select.method", "select.budget")


def recorded_model(run_dir: RunDir) -> tuple[str, Path] | None:
    """(the distilling model's spec, the manifest that records it): the distilled set's, else the first
    expert's; None when neither exists yet."""
    for folder, kind in ((run_dir.distill_dir, "distilled"), (run_dir.expert_run_dir(0), "expert_run")):
        manifest = read_manifest(folder, kind)
        spec = ((manifest or {}).get("base_model") or {}).get("spec")
        if spec:
            return spec, folder / "manifest.json"
    return None


def _get(tree: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        tree = tree.get(part) if isinstance(tree, dict) else None
    return tree


def guard(config: Any, run_dir: RunDir, command: str) -> None:
    """Refuse ``config`` for ``run_dir`` where it contradicts what the folder holds (see the module)."""
    from nacd.configlib import load_yaml, to_dict

    fix = (
        f"give the folder's own config (`nacd {command} {run_dir.root}`), or a run.out_dir that holds what this "
        "config describes"
    )
    model = recorded_model(run_dir)
    if model is not None and model[0] != config.model.spec:
        spec, where = model
        role = "receiving model" if spec in config.compare.receivers else "model"
        raise NacdError(
            f"{where}: field 'base_model.spec' is {spec!r} (the model that distills in this folder), but the "
            f"config's model.spec is {config.model.spec!r} and lists {spec!r} as a {role}; {fix}"
        )
    if not run_dir.config_path.is_file():
        return
    try:
        saved = load_yaml(run_dir.config_path)
    except Exception:  # noqa: BLE001 - an unreadable saved config: the manifests above still guard
        return
    now = to_dict(config)
    for key in IDENTITY_FIELDS:
        then = _get(saved, key)
        if then is not None and then != _get(now, key):
            where, a, b = first_difference(then, _get(now, key), key)  # the leaf: data.sources.0.path
            raise NacdError(
                f"{run_dir.config_path}: field '{where}' is {short_repr(a)} in the folder, "
                f"{short_repr(b)} in the given config; {fix}"
            )
