"""The paired, noise-aware gate on real trained adapters and a real drive: a retrain of the same
data with a new seed is published; an adapter trained on another user's data is refused; the
retrieval baseline is scored beside the base."""

from __future__ import annotations

from dataclasses import replace

import pytest

from lora_assets.adapters import job_for
from lora_assets.drive.publish import publish_adapter
from lora_assets.gate import GateConfig, allowed, evaluate_gate, read_gate
from lora_assets.modes import MODES, build_examples
from lora_assets.settings import Settings
from lora_assets.storage import LocalObjectStore
from lora_assets.training import train_adapters

MAIL = MODES["mail_reply"]


def _job(tables, user, out, **kw):
    job = job_for(MAIL, user, build_examples(MAIL, tables[user]), out, steps=30)
    return replace(job, learning_rate=1e-2, **kw)


@pytest.fixture(scope="module")
def published(tiny_base, synthetic_tables, tmp_path_factory):
    """user-000's adapter on the drive, and user-001's adapter trained alongside."""
    out = tmp_path_factory.mktemp("paired")
    drive = LocalObjectStore(out / "drive")
    own, other = _job(synthetic_tables, "user-000", out / "own"), _job(synthetic_tables, "user-001", out / "other")
    train_adapters([own, other], tiny_base, progress=None)
    publish_adapter(drive, "user-000", tiny_base.ref.key, MAIL.name, own.output_dir, keep=3)
    return drive, own, other, out


def _gate(tiny_base, drive, job, config=GateConfig()):
    (result,) = train_adapters([job], tiny_base, progress=None)
    return evaluate_gate(tiny_base, job, result, drive, "user-000", MAIL.name, config)


def test_a_retrain_of_the_same_data_with_a_new_seed_is_published(tiny_base, published):
    drive, own, _other, out = published
    gate = _gate(tiny_base, drive, replace(own, seed=1, output_dir=out / "reseeded"))
    assert gate.published_version is not None and gate.vs_published is not None, "compared with what devices run"
    assert gate.passed, gate.reason
    assert gate.vs_published.lower <= 0 <= gate.vs_published.upper or gate.vs_published.upper < 0
    # It agrees with the published adapter example by example: shown within the allowance.
    assert gate.vs_published.within(allowed(GateConfig(), gate.published_eval_loss)), gate.vs_published
    assert read_gate(out / "reseeded") == gate


def test_an_adapter_trained_on_another_users_data_is_refused(tiny_base, published):
    drive, own, other, out = published
    # user-000's held-out set and published adapter; the candidate learned user-001's mail.
    gate = _gate(tiny_base, drive, replace(own, train=other.train, output_dir=out / "impostor"))
    assert not gate.passed
    assert gate.vs_published.worse(0.02 * gate.published_eval_loss), "worse by more than the noise allowed"
    assert "worse than published" in gate.reason and "95% confidence" in gate.reason


def test_the_gate_scores_the_retrieval_baseline_and_can_require_beating_it(tiny_base, published):
    drive, own, _other, out = published
    gate = _gate(tiny_base, drive, replace(own, seed=2, output_dir=out / "retrieval"))
    assert gate.retrieval_k == 2 and gate.retrieval_eval_loss is not None
    assert gate.retrieval_eval_loss != gate.base_eval_loss and gate.adapter_retrieval_eval_loss is not None
    off = _gate(tiny_base, drive, replace(own, seed=2, output_dir=out / "no-retrieval"), GateConfig(retrieval_k=0))
    assert off.retrieval_eval_loss is None and off.retrieval_k == 0
    # Required: only the baseline decides here (no margin, the published version never blocks).
    strict = GateConfig(margin=-100.0, confidence=1.0, require_retrieval=True)
    for steps, name in ((1, "weak"), (30, "strong")):
        gate = _gate(tiny_base, drive, replace(own, max_steps=steps, output_dir=out / name), strict)
        assert gate.passed == (gate.adapter_eval_loss < gate.retrieval_eval_loss), gate
        assert gate.passed or "does not beat the retrieval baseline" in gate.reason
    assert Settings.from_env({"LORA_ASSETS_GATE_REQUIRE_RETRIEVAL": "true"}).gate().require_retrieval
