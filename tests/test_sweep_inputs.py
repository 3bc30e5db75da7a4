"""Sweep files and sweep command lines are data (issue 26): a folder given to `sweep local --out`
reaches every trial exactly as written, whatever characters it holds; a malformed sweep YAML, a
job size that is not a count, a trial index out of range or a damaged sweep folder gives one line
`vaepipe sweep: error: ...` (exit 2) naming the file, key and value, never a traceback, and never
runs something other than what was asked."""

import csv
import json
from pathlib import Path

import pytest
import yaml

from pipeline.cli import build_parser
from pipeline.config import load_config
from pipeline.launch import sweep as sw
from tests.conftest import ROOT, vaepipe
from tests.test_sweeps import TINY, write_sweep

LATENT = {"parameters": {"model.latent_dim": {"values": [2, 3]}}}
# names a dotlist value misreads: a comment, a mapping, a list
ODD_NAMES = ["sw #1", "a: b", "- [x] {y}"]


def one_error_line(proc) -> str:
    """The CLI's refusal: exit 2 and a single `vaepipe sweep: error:` line on stderr."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("vaepipe sweep: error: "), \
        f"exit {proc.returncode}\nstdout:\n{proc.stdout[-2000:]}\nstderr:\n{proc.stderr[-3000:]}"
    return lines[0]


def as_fit_reads_it(command: list[str]):
    """The config a trial's `vaepipe fit ...` command line gives (as pipeline.cli.main parses it)."""
    args, rest = build_parser().parse_known_args(command[command.index("fit"):])
    return load_config(args.config, [*args.overrides, *rest])


@pytest.mark.parametrize("name", ODD_NAMES)
def test_trial_commands_carry_the_out_folder_and_names_exactly(tmp_path, name):
    spec = write_sweep(tmp_path / f"{name}.yaml", LATENT)
    out = tmp_path / name / "sweep"
    plan = sw.plan_local(spec, out, None, 0, ["trainer.max_epochs=2"])
    assert json.loads((out / "trials.json").read_text())["trials"][1]["run_dir"] == str((out / "trial-001").resolve())
    for t in plan["trials"]:
        cfg = as_fit_reads_it(t["command"])
        assert cfg.run.dir == t["run_dir"] == str((out / f"trial-{t['index']:03d}").resolve())
        assert cfg.run.name == f"{name}-trial{t['index']:03d}" and cfg.logger.group == name
        assert cfg.model.latent_dim == t["params"]["model.latent_dim"] and cfg.trainer.max_epochs == 2


def test_more_trials_than_a_grid_has_points_is_said(tmp_path, capsys):
    spec = write_sweep(tmp_path / "s.yaml", {**LATENT, "method": "grid"})
    plan = sw.plan_local(spec, tmp_path / "sweep", 5, 0, [])
    assert [t["params"]["model.latent_dim"] for t in plan["trials"]] == [2, 3]
    assert "has 2 points: --trials 5 runs each once" in capsys.readouterr().err
    sw.plan_local(spec, tmp_path / "sweep2", 2, 0, [])
    assert capsys.readouterr().err == ""


def test_a_sweep_folder_with_a_study_continues_extends_or_refuses(tmp_path, capsys):
    """The same sweep again continues its study; more --trials extend it (the trials so far keep
    their points and folders); another seed, other overrides, fewer trials or an edited sweep file
    would mix two studies in one journal: refused, naming the folder, the plan left as it was."""
    from pipeline.launch import search

    spec = write_sweep(tmp_path / "s.yaml", {"method": "random", "parameters": {"model.latent_dim": {"min": 2, "max": 50}}})
    out = tmp_path / "sweep"
    first = sw.plan_local(spec, out, 2, 7, ["trainer.max_epochs=2"])
    search.open_study(out, sw.load_sweep(out / "sweep.yaml", compose=False))  # the study's journal now exists
    assert sw.plan_local(spec, out, 2, 7, ["trainer.max_epochs=2"]) == first
    longer = sw.plan_local(spec, out, 4, 7, ["trainer.max_epochs=2"])
    assert "trials extended to 4" in capsys.readouterr().err
    stored = sw.read_plan(out)
    assert len(stored["trials"]) == 4 and stored["trials"][:2] == json.loads(json.dumps(first["trials"]))
    assert longer["trials"][:2] == first["trials"]
    for trials, seed, extra in ((3, 7, ["trainer.max_epochs=2"]), (4, 8, ["trainer.max_epochs=2"]),
                                (4, 7, ["trainer.max_epochs=3"])):
        with pytest.raises(FileExistsError, match=f"{out} holds the study of another sweep"):
            sw.plan_local(spec, out, trials, seed, extra)
    spec.write_text(spec.read_text().replace("max: 50", "max: 60"))
    with pytest.raises(FileExistsError, match="holds the study of another sweep"):
        sw.plan_local(spec, out, 4, 7, ["trainer.max_epochs=2"])
    assert sw.read_plan(out) == stored


def test_the_job_arrays_folder_is_the_one_given(tmp_path):
    # the array job's folder (its config and logs) too: ':' and '=' are fine in an #SBATCH line
    out = tmp_path / "a:b=c"
    spec = write_sweep(tmp_path / "s.yaml", LATENT)
    proc = vaepipe("sweep", "local", spec, "--out", out, "--slurm", "--dry-run")
    assert f"#SBATCH --output={out}/slurm-%A_%a.out" in proc.stdout
    # with a space it cannot be an #SBATCH line: one line says so
    assert "cannot go into an #SBATCH line" in one_error_line(
        vaepipe("sweep", "local", spec, "--out", tmp_path / "sw #1", "--slurm", "--dry-run", check=False))


def test_local_sweep_writes_exactly_under_an_out_folder_with_hash_and_colon(sprites_root, tmp_path):
    spec = write_sweep(tmp_path / "latent.yaml", {"parameters": {"model.latent_dim": {"values": [2]}}})
    out = Path("runs") / "sw #1: b"  # relative, to the working folder of the sweep
    vaepipe("sweep", "local", spec, "--out", out, f"data.root={sprites_root}",
            *[f"{k}={v}" for k, v in TINY.items()], cwd=tmp_path)
    sweep_dir = tmp_path / out
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["sw #1: b"]  # nothing in runs/sw
    written = yaml.safe_load((sweep_dir / "trial-000" / "config.yaml").read_text())
    assert written["run"]["dir"] == str(sweep_dir / "trial-000")
    assert json.loads((sweep_dir / "trial-000" / "summary.json").read_text())["global_step"] == 4
    rows = list(csv.DictReader(open(sweep_dir / "results.csv")))
    assert [r["status"] for r in rows] == ["done"]
    # the table again, from another folder: the trials are found where they are
    table = vaepipe("sweep", "results", sweep_dir, cwd=ROOT).stdout
    assert " done" in table and "not run" not in table


BAD_SWEEPS = {  # id: (sweep body over write_sweep's base, words the one line must name)
    "metric-a-string": ({"metric": "val/loss", **LATENT}, ["'metric'", "'val/loss'"]),
    "values-a-number": ({"parameters": {"model.latent_dim": {"values": 5}}}, ["model.latent_dim", "'values'", "5"]),
    "values-empty": ({"parameters": {"model.latent_dim": {"values": []}}}, ["model.latent_dim", "'values'"]),
    "values-a-string": ({"parameters": {"run.name": {"values": "abc"}}}, ["run.name", "'values'", "'abc'"]),
    "parameters-a-list": ({"parameters": ["model.beta"]}, ["'parameters'", "model.beta"]),
    "parameters-a-string": ({"parameters": "model.beta"}, ["'parameters'"]),
    "spec-a-string": ({"parameters": {"model.beta": "4"}}, ["model.beta", "'4'"]),
    "min-above-max": ({"method": "random", "parameters": {"optim.lr": {"min": 0.01, "max": 0.001}}},
                      ["optim.lr", "'min'", "0.01", "'max'"]),
    "int-min-above-max": ({"method": "random", "parameters": {"model.latent_dim": {"min": 5, "max": 2}}},
                          ["model.latent_dim", "'min'", "5"]),
    "min-not-a-number": ({"method": "random", "parameters": {"optim.lr": {"min": "small", "max": 0.01}}},
                         ["optim.lr", "'min'", "'small'"]),
    "no-min-max": ({"method": "random", "parameters": {"model.beta": {"distribution": "uniform"}}},
                   ["model.beta", "'min'", "'max'"]),
    "int-uniform-floats": ({"method": "random", "parameters": {
        "model.latent_dim": {"distribution": "int_uniform", "min": 2.5, "max": 8}}}, ["model.latent_dim", "2.5"]),
    "log-uniform-zero": ({"method": "random", "parameters": {
        "optim.lr": {"distribution": "log_uniform_values", "min": 0, "max": 0.01}}}, ["optim.lr", "'min'", "0"]),
    "q-zero": ({"method": "random", "parameters": {
        "model.beta": {"distribution": "q_uniform", "min": 1, "max": 4, "q": 0}}}, ["model.beta", "'q'"]),
    "categorical-without-values": ({"method": "random", "parameters": {"model.beta": {"distribution": "categorical"}}},
                                   ["model.beta", "'values'"]),
    "normal-sigma-negative": ({"method": "random", "parameters": {
        "model.beta": {"distribution": "normal", "mu": 4, "sigma": -1}}}, ["model.beta", "'sigma'", "-1"]),
    "command-a-string": ({"command": "vaepipe fit ${args_no_hyphens}", **LATENT}, ["'command'", "a list"]),
    # its keys read as a command line: was run as one
    "command-a-mapping": ({"command": {"${env}": 1, "vaepipe": 1, "fit": 1, "${args_no_hyphens}": 1}, **LATENT},
                          ["'command'", "a list"]),
}


@pytest.mark.parametrize("body,words", BAD_SWEEPS.values(), ids=BAD_SWEEPS)
def test_a_malformed_sweep_file_is_one_line_naming_file_and_key(tmp_path, body, words):
    spec = write_sweep(tmp_path / "bad.yaml", body)
    # a dry run of the array: on a sweep that was misread it would print a script (and run nothing)
    line = one_error_line(vaepipe("sweep", "local", spec, "--out", tmp_path / "s", "--slurm", "--dry-run",
                                  check=False))
    for word in ["bad.yaml", *words]:
        assert word in line, line
    assert not (tmp_path / "s").exists()  # refused before anything was written


def test_yaml_numbers_without_a_point_are_named(tmp_path):
    # YAML 1.1 reads 1e-4 as text: the sweep would draw between two strings
    spec = tmp_path / "lr.yaml"
    spec.write_text("method: random\nmetric: {name: val/loss}\nparameters:\n  optim.lr: {min: 1e-4, max: 1e-2}\n"
                    "command: ['${env}', vaepipe, fit, '${args_no_hyphens}']\n")
    line = one_error_line(vaepipe("sweep", "local", spec, "--slurm", "--dry-run", "--out", tmp_path / "s", check=False))
    assert "lr.yaml" in line and "optim.lr" in line and "'1e-4'" in line and "1.0e-4" in line


@pytest.mark.parametrize("devices", ["auto", "[0,1]", "-1", "2.5"])
def test_the_job_size_must_be_an_integer(tmp_path, devices):
    spec = write_sweep(tmp_path / "s.yaml", LATENT)
    line = one_error_line(vaepipe("sweep", "local", spec, "--out", tmp_path / "s", "--slurm", "--dry-run",
                                  f"trainer.devices={devices}", check=False))
    assert "'trainer.devices'" in line and "integer" in line and str(yaml.safe_load(devices)) in line
    assert not (tmp_path / "s").exists()
    line = one_error_line(vaepipe("sweep", "submit", "me/vaepipe/abc", "--trials", "2", "--dry-run",
                                  f"trainer.devices={devices}", check=False, cwd=tmp_path))
    assert "'trainer.devices'" in line and "integer" in line


@pytest.mark.parametrize("args,words", [
    (["--trials", "0"], ["--trials", "0"]),  # was: the whole grid
    (["--trials", "-1"], ["--trials", "-1"]),  # was: all but the last point
    (["--parallel", "0"], ["--parallel", "0"]),  # was: --array=0-1%0
    (["model.betta=2"], ["s.yaml", "model.betta"]),  # a typo every trial would fail on
], ids=["trials-0", "trials-negative", "parallel-0", "unknown-key"])
def test_bad_local_sweep_options_are_one_line(tmp_path, args, words):
    spec = write_sweep(tmp_path / "s.yaml", LATENT)
    line = one_error_line(vaepipe("sweep", "local", spec, "--out", tmp_path / "s", "--slurm", "--dry-run", *args,
                                  check=False))
    assert all(w in line for w in words), line


@pytest.mark.parametrize("option", [["--dry-run"], ["--parallel", "2"], ["-c", "site.yaml"], ["slurm.partition=x"]],
                         ids=["dry-run", "parallel", "config", "slurm-key"])
def test_job_array_options_without_slurm_are_refused(tmp_path, option):
    # without --slurm they would be ignored: --dry-run would run the whole sweep here
    (tmp_path / "site.yaml").write_text("slurm: {partition: x}\n")
    spec = write_sweep(tmp_path / "s.yaml", {"parameters": {"model.latent_dim": {"values": [2]}}})
    line = one_error_line(vaepipe("sweep", "local", spec, "--out", tmp_path / "s", *option,
                                  "data.root=/nonexistent/x", "model.beta=-1", check=False, cwd=tmp_path))
    assert option[0] in line and "--slurm" in line


def write_plan(folder: Path, plan) -> Path:
    """A sweep folder as `sweep local` leaves it: the plan, and the sweep file it was drawn from."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "trials.json").write_text(plan if isinstance(plan, str) else json.dumps(plan))
    (folder / "sweep.yaml").write_text(json.dumps({
        "method": "grid", "metric": {"name": "val/loss", "goal": "minimize"},
        "parameters": {"model.beta": {"values": list(range(10))}},
        "command": ["${env}", "vaepipe", "fit", "${args_no_hyphens}"]}))
    return folder


def harmless_plan(n: int) -> dict:
    """A plan whose trials stop at once (an unknown config key, named after the trial): a test that
    runs one by mistake costs nothing."""
    return {"sweep": "s", "metric": {"name": "val/loss", "goal": "minimize"},
            "trials": [{"index": i, "params": {"model.beta": i}, "run_dir": f"/nonexistent/trial-{i:03d}",
                        "command": ["vaepipe", "fit", f"model.trial_{i}_ran=1"]} for i in range(n)]}


@pytest.mark.parametrize("index", ["99", "2", "-1"])
def test_a_trial_index_beyond_the_sweep_is_one_line(tmp_path, index):
    folder = write_plan(tmp_path / "sweep", harmless_plan(2))
    proc = vaepipe("sweep", "trial", folder, index, check=False)
    line = one_error_line(proc)
    assert f"no trial {index}" in line and "2 trials (0-1)" in line and str(folder) in line
    assert "_ran" not in proc.stdout + proc.stderr
    ran = vaepipe("sweep", "trial", folder, "1", check=False)  # a trial it has runs (and stops at its key)
    assert "model.trial_1_ran" in ran.stderr and "model.trial_0_ran" not in ran.stderr, ran.stderr[-2000:]


def test_a_sweep_runs_vaepipe_fit_and_nothing_else(tmp_path):
    """A shared sweep file or sweep folder is data: neither names a program that runs."""
    marker = tmp_path / "pwned"
    plan = harmless_plan(1)
    plan["trials"][0]["command"] = ["sh", "-c", f"touch {marker}", "fit", "model.beta=1"]
    folder = write_plan(tmp_path / "sweep", plan)
    line = one_error_line(vaepipe("sweep", "trial", folder, "0", check=False))
    assert "must run vaepipe fit" in line and not marker.exists()
    base = {"method": "grid", "metric": {"name": "val/loss"}, "parameters": {"model.beta": {"values": [1, 2]}}}
    for command, words in (
            (["sh", "-c", f"touch {marker}", "fit", "${args_no_hyphens}"], "must run vaepipe fit"),
            (["${env}", "vaepipe", "fit", "--help", "${args_no_hyphens}"], "takes -c FILE and key=value"),
            (["${env}", "vaepipe", "fit", f"data.root=pipe:touch {marker}", "${args_no_hyphens}"], "pipe:")):
        path = tmp_path / "s.yaml"
        path.write_text(json.dumps({**base, "command": command}))
        line = one_error_line(vaepipe("sweep", "local", path, "--out", tmp_path / "out", check=False))
        assert words in line and str(path) in line, line
    # a pipe: value however spelled: what the sweep resolves to is checked
    fit = ["${env}", "vaepipe", "fit", "${args_no_hyphens}"]
    for params in ({"data.root": {"values": [f"pipe:touch {marker}"]}},
                   {"data.root": {"value": f" pipe:touch {marker}"}},
                   {"data.root": {"value": f"!!str pipe:touch {marker}"}},
                   {"logger.project": {"value": "pipe"}, "data.root": {"value": f"${{logger.project}}:touch {marker}"}},
                   # not the first value: only trial 0 is composed in full, so every value is checked as read
                   {"logger.project": {"value": "pipe"},
                    "data.root": {"values": ["data/x", f"${{logger.project}}:touch {marker}"]}},
                   {"data.root": {"values": ["data/x", f'"\\x70ipe:touch {marker}"']}}):
        path.write_text(json.dumps({**base, "command": fit, "parameters": params}))
        line = one_error_line(vaepipe("sweep", "local", path, "--out", tmp_path / "out", check=False))
        assert ("pipe:" in line or "interpolation" in line) and "data.root" in line and not marker.exists(), line
    path.write_text("method: grid\nmetric: {name: val/loss}\nparameters: {model.beta: {values: [1]}}\n"
                    f"command: ['${{env}}', vaepipe, fit, 'data.root=\"\\x70ipe:touch {marker}\"', '${{args_no_hyphens}}']\n")
    line = one_error_line(vaepipe("sweep", "local", path, "--out", tmp_path / "out", check=False))
    assert "pipe:" in line and "data.root" in line and not marker.exists(), line


@pytest.mark.parametrize("plan,words", [
    (None, ["not a local sweep folder", "trials.json"]),
    ("{not json", ["trials.json", "damaged", "not valid JSON"]),
    ([], ["trials.json", "damaged", "list"]),
    ({"sweep": "s", "metric": {"name": "val/loss"}, "trials": [{"index": 0}]}, ["trials.json", "damaged", "trial 0"]),
    ({"sweep": "s", "metric": "val/loss", "trials": []}, ["trials.json", "damaged", "'metric'"]),
    ({**harmless_plan(1), "trials": [{**harmless_plan(1)["trials"][0], "command": "echo hi"}]},
     ["trials.json", "damaged", "'command'"]),
], ids=["no-plan", "not-json", "a-list", "trial-keys-missing", "metric-a-string", "command-a-string"])
@pytest.mark.parametrize("command", ["trial", "results"])
def test_a_folder_that_is_not_a_sound_sweep_is_one_line(tmp_path, plan, words, command):
    folder = tmp_path / "sweep"
    folder.mkdir()
    if plan is not None:
        write_plan(folder, plan)
    line = one_error_line(vaepipe("sweep", command, folder, *(["0"] if command == "trial" else []), check=False))
    assert str(folder) in line and all(w in line for w in words), line


def test_an_out_folder_with_an_interpolation_is_refused(tmp_path):
    # the config would read ${run.name} as the run's name: the trials would go elsewhere
    spec = write_sweep(tmp_path / "s.yaml", LATENT)
    line = one_error_line(vaepipe("sweep", "local", spec, "--out", tmp_path / "${run.name}", "--slurm", "--dry-run",
                                  check=False))
    assert "run.dir=" in line and "${run.name}" in line and "interpolation" in line


def test_dotlist_items_read_back_exactly():
    for text in [*ODD_NAMES, "q'uote\"d = x", "tab\tand ünïcode", "", "'", '"', "#", "a=b", "x\\", "$x", "}{",
                 "null", "~", "1e3", "true", "[1, 2]", "{a: 1}", "line\nnext", "% 100%"]:
        cfg = load_config([], [sw.dotlist_item("run.dir", text), sw.dotlist_item("logger.group", text)])
        assert cfg.run.dir == text and cfg.logger.group == text, text


def test_a_pipe_root_given_on_the_command_line_reaches_the_trials(sprites_root, tmp_path):
    """The user's own overrides may name a pipe: root (only the sweep file's may not); the sweep folder's
    files are written by rename (a link planted in a shared folder is replaced, not written through)."""
    spec = write_sweep(tmp_path / "s.yaml", {"parameters": {"model.latent_dim": {"values": [2]}}})
    out = tmp_path / "sweep"
    out.mkdir()
    target = tmp_path / "elsewhere.json"
    target.write_text("original")
    (out / "trials.json").symlink_to(target)
    vaepipe("sweep", "local", spec, "--out", out, f"data.root=pipe:cat {sprites_root}/{{name}}",
            *[f"{k}={v}" for k, v in TINY.items()])
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [r["status"] for r in rows] == ["done"] and target.read_text() == "original"
    (Path(rows[0]["run_dir"]) / "summary.json").write_text("[1, 2]")  # damaged: no traceback; the study says done
    assert "done" in vaepipe("sweep", "results", out).stdout
