"""Matrix files: load and validate, expand into cells with stable ids, show them.

    python -m steps.matrix configs/matrix/default.yaml
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import re
import sys
from pathlib import Path
from typing import Any

import yaml

from steps import CONFIGS_DIR, REPO_ROOT
from steps.plan import catalog, compat, preflight
from steps.plan.schema import (
    AXES,
    AXIS_FIELD,
    REMOTE_KEYS,
    CellSpec,
    ConfigError,
    DataSettings,
    MatrixSpec,
    PlannedCell,
    TrainSettings,
    key_path,
    validate,
)
from steps.plan.settings import RUN_LIMITS, flatten, get, merge, put, unknown_path_problem

# Settings that change how a cell is run, not what it measures: kept out of its id.
_ID_EXCLUDE = {"cell_id": True, "matrix": True, "track": True, "track_context": True, "repeat": True,
               "train": {path.split(".")[1] for path in RUN_LIMITS}}


def _reference_problems(data: dict) -> list[str]:
    """Names that must exist in the catalogs (checked on the raw values, beside the schema)."""
    problems = []
    places = [((), data)] + [
        ((rule, i), entry) for rule in ("exclude", "include")
        for i, entry in enumerate(data.get(rule) or []) if isinstance(entry, dict)
    ]
    for prefix, where in places:
        for axis, check in (("models", catalog.model_reference_problem), ("instance", _instance_problem)):
            values = where.get(axis)
            values = values if isinstance(values, list) else [values] if values is not None else []
            for i, value in enumerate(values):
                if isinstance(value, str) and (msg := check(value)):
                    problems.append(f"{key_path((*prefix, axis, i))}: {msg}")
    return problems


def _instance_problem(name: str) -> str | None:
    known = catalog.instances()
    if name in known or name == LOCAL:
        return None
    return f"{name!r} is not in configs/instances.yaml; allowed values: {LOCAL}, {', '.join(known)}"


LOCAL = "local"  # this machine, as it is: local-gpu where nvidia-smi finds a GPU, else local-cpu


def resolve_local(data: Any) -> Any:
    """`instance: local` (the embedded default's) as the instance this machine is, so that
    `make run` trains on the GPU where there is one and on the CPU elsewhere."""
    if not isinstance(data, dict):
        return data
    here = catalog.LOCAL_GPU if catalog.local_gpus() else "local-cpu"

    def swap(where: dict) -> dict:
        value = where.get("instance")
        if value == LOCAL:
            return {**where, "instance": here}
        if isinstance(value, list) and LOCAL in value:
            return {**where, "instance": list(dict.fromkeys(here if v == LOCAL else v for v in value))}
        return where

    out = swap(data)
    for rule in ("include", "exclude"):
        if isinstance(out.get(rule), list):
            out = {**out, rule: [swap(e) if isinstance(e, dict) else e for e in out[rule]]}
    return out


def _shared_sections(data: dict) -> dict[str, Any]:
    """The matrix's train/data sections as plain data (the defaults where a section has
    problems of its own, which are reported apart)."""
    out = {}
    for section, model in (("train", TrainSettings), ("data", DataSettings)):
        try:
            out[section] = validate(model, data.get(section) or {}, "").model_dump()
        except ConfigError:
            out[section] = model().model_dump()
    return out


def _sections_problems(sections: dict[str, Any], where: str, changed: str) -> list[str]:
    """Validate train/data after a change; problems are named `where` + the changed setting."""
    problems = []
    for section, model in (("train", TrainSettings), ("data", DataSettings)):
        if not changed.startswith(section):
            continue
        try:
            validate(model, sections[section], "")
        except ConfigError as exc:
            rel = changed.partition(".")[2]
            for problem in exc.problems:
                path, _, msg = problem.partition(": ")
                tail = path[len(rel):] if rel and path.startswith(rel) else f".{path}" if not rel else f" ({path})"
                problems.append(f"{where}{tail}: {msg}")
    return problems


def _sweep_problems(sweep: Any, shared: dict[str, Any], where: str) -> list[str]:
    """Each swept setting must exist, and each of its values must be valid there."""
    if not isinstance(sweep, dict):
        return []
    problems = []
    for key, values in sweep.items():
        if key in AXES or key in AXIS_FIELD.values():
            problems.append(f"{where}.{key}: {key} is an axis of the matrix: list its values under `{key}:` instead")
            continue
        if msg := unknown_path_problem(str(key)):
            problems.append(f"{where}.{key}: {msg}")
            continue
        for i, value in enumerate(values if isinstance(values, list) else [values]):
            problems += _sections_problems(put(shared, key, value), f"{where}.{key}[{i}]", key)
        if isinstance(values, list) and not values:
            problems.append(f"{where}.{key}: needs at least one value")
    return problems


def _rule_problems(data: dict) -> list[str]:
    """`include[i].train` / `.data` are changes to the shared sections, `include[i].sweep` and
    `sweep` name settings with values, `exclude[i]` may name settings by dotted keys: each is
    validated against the settings it changes."""
    shared = _shared_sections(data)
    problems = _sweep_problems(data.get("sweep"), shared, "sweep")
    for i, rule in enumerate(data.get("include") or []):
        if not isinstance(rule, dict):
            continue
        changed = dict(shared)
        for section in ("train", "data"):
            if isinstance(rule.get(section), dict):
                changed = put(changed, section, rule[section])
                problems += _sections_problems(changed, f"include[{i}].{section}", section)
        problems += _sweep_problems(rule.get("sweep"), changed, f"include[{i}].sweep")
        problems += [f"include[{i}].{k}: an include rule sets settings with `train:`/`data:` (or adds variants "
                     f"with `sweep:`); dotted keys only match settings in `exclude`" for k in rule if "." in str(k)]
    for i, rule in enumerate(data.get("exclude") or []):
        if isinstance(rule, dict):
            problems += [f"exclude[{i}].{k}: {msg}" for k in rule
                         if "." in str(k) and (msg := unknown_path_problem(str(k)))]
    return problems


def _remote_keys_set(spec: MatrixSpec) -> list[str]:
    """remote keys with a value other than their default (a dumped matrix names them all)."""
    fields = type(spec.remote).model_fields
    return [k for k in spec.remote.model_fields_set
            if getattr(spec.remote, k) != fields[k].get_default(call_default_factory=True)]


def _compute_problems(spec: MatrixSpec) -> list[str]:
    """Where the cells run: remote keys of another compute, one (GPU) instance type per run on
    Metaflow's @kubernetes / @batch (resources are set per step), SageMaker instance types."""
    problems = [f"remote.{key}: only used by compute {', '.join(repr(c) for c in used)}, not {spec.compute!r}"
                for key in sorted(_remote_keys_set(spec))
                if spec.compute not in (used := [c for c, keys in REMOTE_KEYS.items() if key in keys])]
    if spec.compute == "local":
        return problems
    instances = sorted({*spec.instance, *(i for r in spec.include for i in (r.instance or []))})
    if spec.compute == "slurm":
        remote = spec.remote
        if remote.image and not remote.container:
            problems.append("remote.container: an image on Slurm needs the runtime that runs it on the nodes: "
                            "pyxis (srun --container-image, enroot) or apptainer")
        if remote.container and not remote.image:
            problems.append(f"remote.image: remote.container: {remote.container} needs the image it runs "
                            "(e.g. the project's, `make image`)")
        return problems
    if spec.compute == "sagemaker":
        offered = [n for n, e in catalog.instances().items() if e.sagemaker_instance]
        problems += [f"instance: {name!r} is not offered by SageMaker training (no sagemaker_instance "
                     f"in configs/instances.yaml); SageMaker types: {', '.join(offered)}"
                     for name in instances if name in catalog.instances()
                     and not catalog.instances()[name].sagemaker_instance]
        remote = spec.remote
        if remote.max_wait_s is not None and not remote.spot:
            problems.append("remote.max_wait_s: only used with remote.spot: true")
        run_limit = int(spec.train.timeout_s) + remote.startup_allowance_s
        if remote.spot and remote.max_wait_s is not None and remote.max_wait_s < run_limit:
            problems.append(f"remote.max_wait_s: {remote.max_wait_s} is below the jobs' run limit {run_limit} s "
                            f"(train.timeout_s + remote.startup_allowance_s); SageMaker needs at least that")
        if bool(remote.subnets) != bool(remote.security_groups):
            problems.append("remote.subnets / remote.security_groups: a VPC needs both, or neither")
        return problems
    entry = catalog.instances().get(instances[0]) if len(instances) == 1 else None
    if len(instances) != 1 or (entry is not None and entry.local):
        return problems + [
            f"instance: compute {spec.compute!r} runs one instance type per run (Metaflow "
            f"resources are set per step), not {instances}; write one matrix per instance "
            f"type and compare the runs with `python -m steps.report A B`"]
    if spec.compute == "batch" and not spec.remote.queue:
        problems.append("remote.queue: compute 'batch' needs the AWS Batch job queue")
    if not spec.remote.image:
        problems.append(
            f"remote.image: compute {spec.compute!r} runs each cell in a container from this image; build it "
            f"with `make image` (BASE= a CUDA PyTorch image), push it where the cluster pulls from "
            f"(`make image-push REGISTRY=<registry>`), and set remote.image: <registry>/finetune-matrix:<tag>")
    return problems


def _economy_problems(spec: MatrixSpec) -> list[str]:
    """A speed cell must time some steps: more of them than the timing warm-up."""
    economy = spec.economy
    warmup = max([spec.train.timing_warmup_steps, *(
        v for r in spec.include for v in [(r.train or {}).get("timing_warmup_steps")] if isinstance(v, int))])
    if economy is None or economy.speed_steps > warmup:
        return []
    return [f"economy.speed_steps: {economy.speed_steps} leaves no timed step after train.timing_warmup_steps="
            f"{warmup}; allowed values: more than {warmup}"]


def _repeats_problems(spec: MatrixSpec) -> list[str]:
    """Repeats own the seeds: a seed swept as well would make two cells of one seed."""
    if spec.repeats == 1:
        return []
    swept = ["sweep"] * ("train.seed" in spec.sweep) + [
        f"include[{i}].sweep" for i, rule in enumerate(spec.include) if "train.seed" in (rule.sweep or {})]
    return [f"{where}.train.seed: repeats: {spec.repeats} sets the seeds (train.seed .. train.seed+"
            f"{spec.repeats - 1}); sweep the seed or set repeats, not both" for where in swept]


def project_path(value: str) -> Path:
    """`report.project_to` as a file: an absolute path as it is, else from the repository root
    (where `python -m steps.plan` and the flow run)."""
    path = Path(value).expanduser()
    return path if path.is_absolute() else REPO_ROOT / path


def _report_problems(spec: MatrixSpec) -> list[str]:
    """`report.project_to` must name a matrix file that parses (its own `report:` aside, so that
    two matrices may name each other)."""
    value = spec.report.project_to
    if value is None:
        return []
    path = project_path(value)
    matrices = ", ".join(str(p.relative_to(REPO_ROOT)) for p in sorted((CONFIGS_DIR / "matrix").glob("*.yaml")))
    if not path.is_file():
        return [f"report.project_to: {value!r} is not a file (a path from the repository root {REPO_ROOT}, or "
                f"absolute); allowed values: a matrix file, such as {matrices}"]
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        parse_matrix({k: v for k, v in data.items() if k != "report"} if isinstance(data, dict) else data, str(path))
    except yaml.YAMLError as exc:
        return [f"report.project_to: {value!r} is not valid YAML ({str(exc).splitlines()[0]}); allowed values: a "
                f"matrix file, such as {matrices}"]
    except ConfigError as exc:
        shown = "; ".join(exc.problems[:3]) + (f"; and {len(exc.problems) - 3} more" if len(exc.problems) > 3 else "")
        return [f"report.project_to: {value!r} is not a valid matrix ({shown}); allowed values: a matrix file "
                f"that `python -m steps.matrix` accepts"]
    return []


def parse_matrix(data: Any, source: str = "matrix") -> MatrixSpec:
    """Validate a matrix mapping; every problem is reported at once in one ConfigError."""
    problems: list[str] = []
    spec = None
    data = resolve_local(data)
    try:
        spec = validate(MatrixSpec, data, source)
    except ConfigError as exc:
        problems.extend(exc.problems)
    if isinstance(data, dict):
        problems.extend(_reference_problems(data) + _rule_problems(data))
    if spec is not None:
        problems.extend(_compute_problems(spec) + _economy_problems(spec) + _repeats_problems(spec)
                        + _report_problems(spec))
    if problems:
        raise ConfigError(problems, source)
    return spec


def parse_matrix_text(text: str) -> dict[str, Any]:
    """Metaflow Config parser: YAML text in, the validated and normalised matrix out.

    Problems are raised as a MetaflowException so the CLI prints them, not a traceback.
    """
    from metaflow.exception import MetaflowException

    try:
        data = yaml.safe_load(text)
        return parse_matrix(data).model_dump(mode="json")
    except yaml.YAMLError as exc:
        raise MetaflowException(f"matrix: not valid YAML: {exc}") from None
    except ConfigError as exc:
        raise MetaflowException(str(exc)) from None


def load_matrix(path: str | Path) -> MatrixSpec:
    text = Path(path).read_text(encoding="utf-8")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError([f"<top>: not valid YAML: {exc}"], str(path)) from None
    return parse_matrix(data, str(path))


def _prune(d: dict[str, Any]) -> dict[str, Any]:
    """Drop sections left empty once defaults and run limits are taken out."""
    out = {}
    for k, v in d.items():
        v = _prune(v) if isinstance(v, dict) else v
        if v != {}:
            out[k] = v
    return out


def cell_id(settings: dict[str, Any]) -> str:
    """Readable prefix + hash of the settings that differ from the defaults.

    Hashing only non-default values keeps ids stable when a later version adds a setting
    with a default, and makes `seed: 0` written out equal to leaving it out.
    """
    cell = CellSpec.model_validate({**settings, "cell_id": ""})
    canonical = _prune(cell.model_dump(mode="json", exclude_defaults=True, exclude=_ID_EXCLUDE))
    blob = json.dumps(canonical, sort_keys=True, separators=(",", ":"))
    digest = hashlib.sha256(blob.encode()).hexdigest()[:10]
    model = re.sub(r"[^A-Za-z0-9.]+", "-", cell.model.rstrip("/").split("/")[-1]).strip("-")
    return f"{model}-{cell.peft}-{cell.strategy}-{cell.nodes}x{cell.gpus}-{digest}"


def _combos(sweep: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Every combination of swept values ([{}] when nothing is swept)."""
    keys = list(sweep)
    return [dict(zip(keys, values)) for values in itertools.product(*(sweep[k] for k in keys))]


def _apply(sections: dict[str, Any], combo: dict[str, Any]) -> dict[str, Any]:
    for key, value in combo.items():
        sections = put(sections, key, value)
    return sections


def _combo_key(combo: dict[str, Any]) -> tuple:
    return tuple(sorted((k, json.dumps(v, sort_keys=True)) for k, v in combo.items()))


def _matches(rule, point: dict[str, Any], sections: dict[str, Any]) -> bool:
    return (all(point[a] in allowed for a, allowed in rule.axes().items())
            and all(get(sections, k) in allowed for k, allowed in rule.settings.items()))


def expand(spec: MatrixSpec) -> list[PlannedCell]:
    """The cartesian product of the axes (in file order) and the swept settings, minus
    `exclude`, plus `include`.

    Each cell is checked for compatibility; `single` runs one process whatever the gpus/nodes
    axes say; duplicates are merged. An `include` entry whose axis values (and swept values)
    are already a cell changes that cell's train/data settings instead of adding a copy; its
    own `sweep` adds variants beside the cells it names.
    """
    base = {"train": spec.train.model_dump(), "data": spec.data.model_dump()}
    chosen: dict[tuple, dict[str, Any]] = {}  # (axis values, swept values) -> that cell's sections
    for values in itertools.product(*(getattr(spec, axis) for axis in AXES)):
        point = dict(zip(AXES, values))
        for combo in _combos(spec.sweep):
            sections = _apply(base, combo)
            if not any(_matches(rule, point, sections) for rule in spec.exclude):
                chosen[(values, _combo_key(combo))] = sections
    for rule in spec.include:
        given, own = rule.axes(), rule.sweep or {}
        matrix_combos = _combos({k: v for k, v in spec.sweep.items() if k not in own})
        for values in itertools.product(*(given.get(axis, getattr(spec, axis)) for axis in AXES)):
            for combo, variant in itertools.product(matrix_combos, _combos(own)):
                sections = _apply(base, combo)
                sections = {k: merge(sections[k], getattr(rule, k) or {}) for k in ("train", "data")}
                chosen[(values, _combo_key({**combo, **variant}))] = _apply(sections, variant)
    planned: dict[str, PlannedCell] = {}
    for (values, _), sections in chosen.items():
        settings = {AXIS_FIELD[axis]: v for axis, v in zip(AXES, values)}
        if settings["strategy"] == "single":
            settings.update(nodes=1, gpus=1)
        settings.update(sections, matrix=spec.name, track=spec.track.model_dump())
        for repeat in range(spec.repeats):  # each repeat its own seed, so its own id
            each = {**settings, "train": {**sections["train"], "seed": sections["train"]["seed"] + repeat},
                    "repeat": repeat}
            cid = cell_id(each)
            if cid not in planned:
                cell = CellSpec.model_validate({**each, "cell_id": cid})
                planned[cid] = PlannedCell(cell, compat.refusal(cell))
    return list(planned.values())


def varying_settings(flat: list[dict[str, Any]]) -> list[str]:
    """The train/data settings (dotted names) that differ between cells (each `flatten`ed), run
    limits aside."""
    return [k for k in (flat[0] if flat else {}) if k not in RUN_LIMITS
            and len({json.dumps(f[k], sort_keys=True) for f in flat}) > 1]


def show(planned: list[PlannedCell], out=sys.stdout) -> None:
    from rich.console import Console
    from rich.table import Table

    refused = sum(p.refused is not None for p in planned)
    flat = [flatten(p.cell) for p in planned]
    swept = varying_settings(flat)
    table = Table(title=f"{len(planned)} cells: {len(planned) - refused} run, {refused} refused",
                  show_lines=False)
    for col in ("cell_id", "peft", "strategy", "nodes x gpus", "instance", "lr", "mb x ga",
                "precision", "seq", *(["settings"] if swept else []), "status"):
        table.add_column(col)
    for p, values in zip(planned, flat):
        c = p.cell
        table.add_row(
            c.cell_id, c.peft, c.strategy, f"{c.nodes} x {c.gpus}", c.instance, f"{c.lr:g}",
            f"{c.micro_batch} x {c.grad_accum}", c.precision, str(c.seq_len),
            *([" ".join(f"{k.partition('.')[2]}={values[k]}" for k in swept)] if swept else []),
            f"refused: {p.refused}" if p.refused else "runs",
        )
    Console(file=out, width=200).print(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("matrix", help="matrix YAML file")
    parser.add_argument("--no-check", action="store_true",
                        help="skip the checks of models, adapters and data (no model facts read)")
    args = parser.parse_args(argv)
    try:
        spec = load_matrix(args.matrix)
        planned = expand(spec) if args.no_check else preflight.check(spec, expand(spec))
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    show(planned)
    return 0

