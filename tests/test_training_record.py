"""The run record (JSON) and the weights (plain state dicts): what export and fine-tuning read from a run folder."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.torch

from click.testing import CliRunner  # noqa: E402
from conftest import pickle_payload_run  # noqa: E402

from wbc_batch.cli import main  # noqa: E402
from wbc_batch.errors import ExitCode  # noqa: E402
from wbc_batch.inference.metadata import ModelError  # noqa: E402
from wbc_batch.training.config import TrainConfig  # noqa: E402
from wbc_batch.training.record import RunRecord, load_weights, save_weights  # noqa: E402

PACKAGE = Path(__file__).resolve().parent.parent / "wbc_batch"


def _record() -> RunRecord:
    cfg = TrainConfig("data", "run", size=(120, 160), crop=(80, 40), epochs=3, device="cpu")  # resolved, as a run records it
    spec = {"height": 120, "width": 160, "resize": "bilinear", "jpeg_draft": True, "max_pixels": 89478485}
    return RunRecord(cfg, ("A", "B"), spec, 10, 4, False, ["A/1"], "cpu", "2.x", best_epoch=2, last_epoch=3)


def test_record_round_trips_through_json(tmp_path):
    rec = _record()
    rec.write(tmp_path)
    d = json.loads((tmp_path / "config.json").read_text())
    # Flat, as config.json always was: the config's fields at the top level.
    assert d["size"] == [120, 160] and d["crop"] == [80, 40] and d["classes"] == ["A", "B"] and d["epochs"] == 3
    back = RunRecord.read(tmp_path)
    assert back == rec and back.size == (120, 160) and back.crop == (80, 40)
    assert back.epoch_of("best.pt") == 2 and back.epoch_of("last.pt") == 3


def test_record_reads_a_run_folder_from_before_the_record():
    old = {k: v for k, v in _record().to_dict().items() if k not in ("best_epoch", "last_epoch", "init")}
    old["crop"] = None
    rec = RunRecord.from_dict({**old, "unknown_future_key": 1})
    assert rec.crop is None and rec.best_epoch is None and rec.classes == ("A", "B")


def test_not_a_run_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a wbc-batch run folder"):
        RunRecord.read(tmp_path)


def test_weights_are_a_plain_state_dict_read_without_pickle(tmp_path):
    sd = torch.nn.Linear(3, 2).state_dict()
    save_weights(sd, tmp_path / "w.pt")
    raw = torch.load(tmp_path / "w.pt", weights_only=True)
    assert set(raw) == {"weight", "bias"} and all(torch.equal(raw[k], sd[k]) for k in sd)
    assert load_weights(tmp_path / "w.pt").keys() == sd.keys()
    torch.save({"state_dict": sd, "epoch": 4}, tmp_path / "old.pt")  # the layout of run folders before the record
    assert torch.equal(load_weights(tmp_path / "old.pt")["weight"], sd["weight"])


def test_weights_that_would_run_code_are_refused(tmp_path):
    torch.save({"weight": torch.zeros(1), "evil": Path("x")}, tmp_path / "evil.pt")
    with pytest.raises(ModelError, match=r"evil.pt: refused: loading it would call pathlib\.\w*Path, .*weights are tensors only"):
        load_weights(tmp_path / "evil.pt")
    run = pickle_payload_run(tmp_path / "run", tmp_path / "ran")
    with pytest.raises(ModelError, match=r"best.pt: refused: loading it would call \w+\.system, which a file of weights never needs"):
        load_weights(run / "best.pt")
    assert not (tmp_path / "ran").exists()


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "empty or truncated"),
        (b"hello world\n", "corrupt"),
        (b"\x80\x02\xff", "refused: not a plain file of tensors"),
        ("half", "corrupt"),
    ],
)
def test_unreadable_weights_are_a_model_error(tmp_path, content, message):
    path = tmp_path / "w.pt"
    save_weights(torch.nn.Linear(3, 2).state_dict(), path)
    path.write_bytes(path.read_bytes()[:100] if content == "half" else content)
    with pytest.raises(ModelError, match=f"^{re.escape(str(path))}: .*{message}") as e:
        load_weights(path)
    assert e.value.exit_code == ExitCode.MODEL == 4


def test_export_of_weights_that_would_run_code_is_a_message_and_exit_4(tmp_path):
    run = pickle_payload_run(tmp_path / "run", tmp_path / "ran")
    res = CliRunner().invoke(main, ["export", str(run), "-o", str(tmp_path / "m.onnx")])
    assert res.exit_code == 4, res.output
    assert res.output.startswith(f"wbc-batch: error: {run / 'best.pt'}: refused: loading it would call ")
    assert "Traceback" not in res.output and not (tmp_path / "m.onnx").exists() and not (tmp_path / "ran").exists()


def test_export_of_a_folder_that_is_not_a_run_is_a_message(tmp_path):
    res = CliRunner().invoke(main, ["export", str(tmp_path), "-o", str(tmp_path / "m.onnx")])
    assert res.exit_code == 4, res.output
    assert res.output == f"wbc-batch: error: {tmp_path} is not a wbc-batch run folder: no config.json\n"


def test_no_module_unpickles_with_weights_only_false():
    hits = [p for p in PACKAGE.rglob("*.py") if re.search(r"weights_only\s*=\s*False", p.read_text())]
    assert hits == []
