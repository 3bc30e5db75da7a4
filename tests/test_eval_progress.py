"""`vaepipe eval` tells before it starts how much work it has and, early, how long it will take;
its progress advances by chunks of importance samples, so one batch of a large K is many ticks."""

import re

from tests.conftest import FAST, vaepipe


def test_eval_announces_its_work_and_advances_within_a_batch(sprites_root, tmp_path):
    run = tmp_path / "run"
    vaepipe("fit", *FAST, "data.name=sprites", f"data.root={sprites_root}", "model.arch=mlp", "model.hidden=[32]",
            "model.latent_dim=4", "model.eval_k=0", "trainer.max_steps=5", f"run.dir={run}", "run.test=false")
    # One batch of 100 test images at K = 5000: 0.5 M log-weights, ~10-20 s on 2 CPU cores.
    proc = vaepipe("eval", run, "--k", "5000", "--limit", "100", "--batch-size", "100", "--no-compile")
    err = proc.stderr
    assert "eval test: 100 examples x (K=5000 + 1 for L_1) = 0.5 M importance samples on cpu" in err
    assert re.search(r"estimated time: \d+ s more at \d+k samples/s", err)
    # tqdm redraws at most once a second: several redraws inside the one batch, with an ETA
    ticks = re.findall(r"(\d+(?:\.\d+)?)k/500k \[\d\d:\d\d<(\d\d:\d\d)", err)
    assert len({done for done, _ in ticks}) >= 3, err[-2000:]
    assert "nll" in proc.stdout
