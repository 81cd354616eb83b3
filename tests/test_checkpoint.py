"""Training checkpoints: atomic writes (a crash mid-write leaves the previous one usable), the `latest`
pointer, keep-last-K, leftovers ignored, weights_only loading, and checkpoints as loadable model folders."""

import json
import os

import pytest
import torch

from pdengine.engine.pipeline import PixelDancePipeline, check_model_folder
from pdengine.model import UNet3D
from pdengine.train.checkpoint import (
    LATEST_NAME,
    STATE_JSON,
    STATE_PT,
    CheckpointError,
    checkpoints_dir,
    latest_checkpoint,
    list_checkpoints,
    load_trainer_state,
    save_checkpoint,
    write_final,
    write_model_folder,
)
from tests.kernel_utils import assert_close


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from intra-op threads, and OpenMP threads stall for seconds when the small
    test machine is shared with other processes: one thread keeps these tests fast and steady."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _unet(seed=0):
    torch.manual_seed(seed)
    return UNet3D.from_preset("tiny", cross_attention_dim=32)


def _writer(step, unet=None, parts=None, fail_after_unet=False):
    """What the trainer's writer does: model folder, then the state files."""

    def write(folder):
        write_model_folder(folder, unet or _unet(), parts, {"num_train_timesteps": 1000})
        if fail_after_unet:
            raise RuntimeError("simulated crash mid-write")
        torch.save({"optimizer": {"state": {}, "param_groups": []}, "rng": [{"torch_cpu": torch.get_rng_state()}]},
                   folder / STATE_PT)
        (folder / STATE_JSON).write_text(json.dumps({"step": step}))

    return write


def _pointer(out):
    return (checkpoints_dir(out) / LATEST_NAME).read_text().strip()


def test_layout_latest_pointer_and_keep_last_k(tmp_path):
    for step in (1, 2, 3, 4):
        path = save_checkpoint(tmp_path, step, _writer(step), keep=2)
        assert path.name == f"step-{step:06d}" and _pointer(tmp_path) == path.name
    assert [s for s, _ in list_checkpoints(tmp_path)] == [3, 4]
    assert sorted(p.name for p in checkpoints_dir(tmp_path).iterdir()) == ["latest", "step-000003", "step-000004"]
    state, tensors = load_trainer_state(latest_checkpoint(tmp_path))
    assert state["step"] == 4 and torch.equal(tensors["rng"][0]["torch_cpu"], torch.get_rng_state())


def test_crash_mid_write_keeps_the_previous_checkpoint(tmp_path):
    unet = _unet(1)
    save_checkpoint(tmp_path, 1, _writer(1, unet), keep=3)
    with pytest.raises(RuntimeError, match="simulated crash"):
        save_checkpoint(tmp_path, 2, _writer(2, _unet(2), fail_after_unet=True), keep=3)
    # No step-2 folder, no temp folder left, the pointer and step 1 untouched and loadable.
    assert sorted(p.name for p in checkpoints_dir(tmp_path).iterdir()) == ["latest", "step-000001"]
    assert _pointer(tmp_path) == "step-000001"
    loaded = UNet3D.from_pretrained(latest_checkpoint(tmp_path) / "unet")
    for k, v in unet.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_leftovers_of_a_killed_write_are_ignored_then_removed(tmp_path):
    save_checkpoint(tmp_path, 1, _writer(1), keep=3)
    root = checkpoints_dir(tmp_path)
    # What a kill leaves: a half-built temp folder, a half-deleted old one, a step folder lacking its state
    # (a hand copy), and a `latest` that lags behind a completed rename.
    (root / ".tmp-step-000002-abcd" / "unet").mkdir(parents=True)
    (root / ".del-step-000000-1").mkdir()
    (root / "step-000005").mkdir()
    (root / "step-000005" / STATE_JSON).write_text("{}")
    assert latest_checkpoint(tmp_path).name == "step-000001"
    save_checkpoint(tmp_path, 2, _writer(2), keep=3)
    os.replace(root / LATEST_NAME, root / "latest-old")
    (root / LATEST_NAME).write_text("step-000001\n")  # pointer lags: the newest complete one still wins
    assert latest_checkpoint(tmp_path).name == "step-000002"
    save_checkpoint(tmp_path, 3, _writer(3), keep=3)
    names = sorted(p.name for p in root.iterdir())
    assert not [n for n in names if n.startswith((".tmp-", ".del-"))]
    assert [s for s, _ in list_checkpoints(tmp_path)] == [1, 2, 3]


def test_rewriting_an_existing_step_replaces_it(tmp_path):
    save_checkpoint(tmp_path, 1, _writer(1, _unet(1)), keep=3)
    unet = _unet(2)
    save_checkpoint(tmp_path, 1, _writer(1, unet), keep=3)
    loaded = UNet3D.from_pretrained(latest_checkpoint(tmp_path) / "unet")
    assert_close(loaded.conv_in.weight, unet.conv_in.weight, name="conv_in")


def test_state_is_loaded_weights_only(tmp_path):
    path = save_checkpoint(tmp_path, 1, _writer(1), keep=1)
    # An arbitrary pickled object is refused by torch.load(weights_only=True).
    torch.save({"optimizer": _Opaque()}, path / STATE_PT)
    with pytest.raises(CheckpointError, match="cannot read"):
        load_trainer_state(path)
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        load_trainer_state(tmp_path)


class _Opaque:
    pass


def test_checkpoint_is_a_model_folder_generate_loads(tmp_path, tiny_pipeline_dir):
    unet = UNet3D.from_pretrained(tiny_pipeline_dir / "unet")
    with torch.no_grad():
        unet.conv_out.bias.add_(1.0)  # "trained": differs from the source folder's unet
    path = save_checkpoint(tmp_path, 7, _writer(7, unet, tiny_pipeline_dir), keep=1)
    index = check_model_folder(path)
    assert index["_class_name"] == "PixelDancePipeline" and index["unet"] == ["pdengine", "UNet3D"]
    # Frozen parts are linked (or copied) from the source, byte for byte.
    for part in ("vae", "text_encoder", "tokenizer"):
        for f in (tiny_pipeline_dir / part).iterdir():
            assert (path / part / f.name).read_bytes() == f.read_bytes()
    pipe = PixelDancePipeline.from_pretrained(path)
    assert_close(pipe.unet.conv_out.bias, unet.conv_out.bias, name="trained unet")


def test_write_final_replaces_atomically(tmp_path):
    write_final(tmp_path, lambda f: (f / "a.txt").write_text("1"))
    write_final(tmp_path, lambda f: (f / "b.txt").write_text("2"))
    assert sorted(p.name for p in (tmp_path / "final").iterdir()) == ["b.txt"]
    with pytest.raises(RuntimeError):
        write_final(tmp_path, lambda f: (_ for _ in ()).throw(RuntimeError("boom")))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]
