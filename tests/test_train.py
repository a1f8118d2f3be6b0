"""The training CLI (python -m spikeops.train): options, datasets, logs/checkpoints, exact resume,
DDP == single process, AMP, pre-training -> fine-tuning.

Most runs use the tiny spiking nets of tests/tiny_models.py (registered under test-only names)
on the bundled digits at 8x8, in-process, with one CPU thread.
"""
import json
import os
import pickle
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from tiny_models import TINY, TINY_NOBN, TinySNN  # registers the tiny models

from spikeops.train import UsageError, cli, data as tdata, loop, recipes
from spikeops.train.data import DataError

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent


@pytest.fixture(autouse=True)
def one_thread():
    """The tiny models run far faster on one thread (and the machine is shared)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny(out, *extra, model=TINY):
    return ["--model", model, "--img-size", "8", "--T", "2", "--batch-size", "32", "--lr", "5e-3",
            "--warmup-epochs", "0.5", "--out", str(out), "--no-progress", *extra]


def load_ckpt(out):
    return torch.load(Path(out) / "last.pt", map_location="cpu", weights_only=True)


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


# ------------------------------------------------------------------------------ options
def test_recipes_defaults_and_overrides():
    a = cli.parse_args(["--model", TINY, "--recipe", "spikformer-cifar", "--lr", "1e-4", "--T", "2"])
    assert (a.lr, a.T) == (1e-4, 2)  # explicit flags win
    assert (a.weight_decay, a.batch_size, a.epochs, a.warmup_epochs, a.label_smoothing) == (0.06, 128, 300, 20, 0.1)
    for name in ("qkformer-cifar", "msvit-cifar"):
        a = cli.parse_args(["--model", TINY, "--recipe", name])
        assert (a.lr, a.batch_size, a.epochs, a.T, a.weight_decay) == (1e-3, 64, 400, 4, 0.06)
    a = cli.parse_args(["--model", TINY])
    assert a.recipe is None and a.label_smoothing == 0.1 and a.T == recipes.DEFAULTS["T"]
    assert a.dataset == "digits" and a.amp == "off" and a.mode == "train"
    assert cli.parse_args(["--model", "spikformer_v2_8_384", "--mode", "pretrain"]).T == 1
    help_text = cli.build_parser().format_help()
    assert "RandAugment" in help_text and "NOT implemented" in help_text
    with pytest.raises(SystemExit):
        cli.parse_args(["--model", TINY, "--mode", "finetune"])  # needs --checkpoint


def test_warmup_cosine_schedule():
    f = loop.warmup_cosine(total_steps=100, warmup_steps=10, min_ratio=0.01)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    vals = [f(s) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(vals, vals[1:]))
    assert f(100) == pytest.approx(0.01) and f(500) == pytest.approx(0.01)


def test_cli_entry_point_help():
    r = subprocess.run([sys.executable, "-m", "spikeops.train", "--help"], capture_output=True, text=True, cwd=ROOT,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert "--resume" in r.stdout and "--recipe" in r.stdout
    setup_py = (ROOT / "setup.py").read_text()
    assert "spikeops-train=spikeops.train.cli:main" in setup_py and callable(cli.main)


# ----------------------------------------------------------------------------- datasets
def test_digits_dataset():
    b = tdata.build("digits", None, img_size=16, in_channels=3)
    assert (len(b.train), len(b.test), b.num_classes) == (1437, 360, 10)
    x, y, i = b.train[0]
    assert x.shape == (1, 16, 16) and 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    per_class = torch.bincount(torch.cat([b.train.labels, b.test.labels]), minlength=10)
    test_share = torch.bincount(b.test.labels, minlength=10) / per_class  # stratified: 20% of each class
    assert per_class.sum() == 1797 and float((test_share - 360 / 1797).abs().max()) < 0.005
    batch = b.train_transform(b.train.images[:4])
    assert batch.shape == (4, 3, 16, 16)
    # the split is fixed, and 8x8 keeps the raw values / 16
    raw, lab = tdata.load_digits_arrays()
    b8 = tdata.build("digits", None, img_size=8, in_channels=1)
    tr, te = tdata.stratified_split(lab, 360, seed=0)
    torch.testing.assert_close(b8.test.images[:, 0], torch.from_numpy(raw[te] / 16.0).float())


def _write_fake_cifar(root: Path, folder: str, files: dict, label_key: bytes):
    d = root / folder
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    made = {}
    for name, n in files.items():
        x = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        y = rng.integers(0, 10, size=n).tolist()
        with open(d / name, "wb") as f:
            pickle.dump({b"data": x, label_key: y, b"filenames": [b"x"] * n}, f)
        made[name] = (x, y)
    return made


def test_missing_cifar_gives_clear_error(tmp_path, capsys):
    with pytest.raises(DataError) as e:
        cli.run(tiny(tmp_path / "out", "--dataset", "cifar10", "--data-dir", str(tmp_path)))
    msg = str(e.value)
    assert "cifar-10-batches-py" in msg and "data_batch_1" in msg and "test_batch" in msg and str(tmp_path) in msg
    assert "cifar-10-python.tar.gz" in msg
    with pytest.raises(DataError, match="--data-dir is required"):
        tdata.build("cifar100", None)
    # a partial copy names the missing files
    _write_fake_cifar(tmp_path, "cifar-100-python", {"train": 2}, b"fine_labels")
    with pytest.raises(DataError, match=r"missing files .*cifar-100-python/test"):
        tdata.build("cifar100", str(tmp_path))
    # the CLI prints it as one line, exit status 2
    assert cli.main(tiny(tmp_path / "out", "--dataset", "cifar10", "--data-dir", str(tmp_path / "nowhere"))) == 2
    assert "cifar-10-batches-py" in capsys.readouterr().err


def test_cifar_reader_on_fake_archives(tmp_path):
    files = {f"data_batch_{i}": 3 for i in range(1, 6)}
    files["test_batch"] = 4
    made = _write_fake_cifar(tmp_path / "c10", "cifar-10-batches-py", files, b"labels")
    b = tdata.build("cifar10", str(tmp_path / "c10"))
    assert (len(b.train), len(b.test), b.num_classes, b.img_size) == (15, 4, 10, 32)
    x, y, _ = b.train[4]  # second image of data_batch_2: rows are 1024 R, 1024 G, 1024 B values
    raw_x, raw_y = made["data_batch_2"]
    assert x.dtype == torch.uint8 and x.shape == (3, 32, 32)
    assert torch.equal(x, torch.from_numpy(raw_x[1].reshape(3, 32, 32))) and int(y) == raw_y[1]
    assert int(x[1, 0, 5]) == int(raw_x[1][1024 + 5])

    # CIFAR-100 read straight from the original .tar.gz (fine labels)
    made100 = _write_fake_cifar(tmp_path / "tmp100", "cifar-100-python", {"train": 6, "test": 2}, b"fine_labels")
    (tmp_path / "c100").mkdir()
    with tarfile.open(tmp_path / "c100" / "cifar-100-python.tar.gz", "w:gz") as t:
        t.add(tmp_path / "tmp100" / "cifar-100-python", arcname="cifar-100-python")
    b100 = tdata.build("cifar100", str(tmp_path / "c100"))
    assert (len(b100.train), len(b100.test), b100.num_classes) == (6, 2, 100)
    assert b100.test.labels.tolist() == made100["test"][1]

    # augmentation: each image is a window of its zero-padded (possibly flipped) self, a pure
    # function of (seed, epoch, index); normalisation matches the constants
    tf = tdata.BatchTransform(32, 3, pad=4, flip=True)
    imgs = b.train.images[:6]
    ids = torch.arange(6)
    out = tf(imgs, ids, seed=1, epoch=2)
    assert torch.equal(out, tf(imgs, ids, seed=1, epoch=2)) and not torch.equal(out, tf(imgs, ids, seed=1, epoch=3))
    padded = torch.nn.functional.pad(imgs.float() / 255, (4, 4, 4, 4))
    for k in range(6):
        cands = [p.flip(-1) if f else p for p in [padded[k]] for f in (False, True)]
        assert any(torch.equal(out[k], c[:, oy:oy + 32, ox:ox + 32]) for c in cands for oy in range(9) for ox in range(9))
    norm = b.test_transform(imgs[:2])
    mean = torch.tensor(tdata._CIFAR["cifar10"]["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(tdata._CIFAR["cifar10"]["std"]).view(1, 3, 1, 1)
    torch.testing.assert_close(norm, (imgs[:2].float() / 255 - mean) / std)

    # and the CLI trains on it
    s = cli.run(tiny(tmp_path / "run", "--dataset", "cifar10", "--data-dir", str(tmp_path / "c10"), "--batch-size", "4",
                     "--epochs", "1", "--img-size", "16"))
    assert s["steps"] == 3 and s["epochs_done"] == 1


def test_imagefolder_reader(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 3), ("val", 1)):
        for c in ("cat", "dog"):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(n):
                arr = rng.integers(0, 256, size=(10, 12, 3), dtype=np.uint8)
                Image.fromarray(arr).save(tmp_path / split / c / f"{i}.{'png' if i % 2 == 0 else 'jpg'}")
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image")
    b = tdata.build("imagefolder", str(tmp_path), img_size=8)
    assert (len(b.train), len(b.test), b.num_classes, b.classes) == (6, 2, 2, ["cat", "dog"])
    x, y, _ = b.train[3]
    assert x.shape == (3, 8, 8) and x.dtype == torch.uint8 and int(y) == 1
    assert sorted(int(b.test[i][1]) for i in range(2)) == [0, 1]
    gray = tdata.build("imagefolder", str(tmp_path), img_size=8, in_channels=1)
    assert gray.train[0][0].shape == (1, 8, 8)
    s = cli.run(tiny(tmp_path / "run", "--dataset", "imagefolder", "--data-dir", str(tmp_path), "--batch-size", "2",
                     "--epochs", "1", "--workers", "0"))
    assert s["steps"] == 3
    with pytest.raises(DataError, match=r"train/train is not a directory"):
        tdata.build("imagefolder", str(tmp_path / "train"))
    (tmp_path / "val" / "bird").mkdir()
    with pytest.raises(DataError, match="does not occur in the train split"):
        tdata.build("imagefolder", str(tmp_path))


# ----------------------------------------------------------------------------- training
def test_cli_trains_digits_and_writes_logs(tmp_path):
    out = tmp_path / "run"
    s = cli.run(tiny(out, "--epochs", "2", "--max-steps", "50"))  # 44 steps/epoch: one epoch and 6 steps
    assert s["steps"] == 50 and s["epochs_done"] == 1 and s["peak_mem_kind"] == "cpu_peak_rss_process"
    assert s["images_per_s"] > 0 and s["peak_mem_mib"] > 0 and 0 <= s["final_test_acc"] <= 100
    rows = read_jsonl(out / "log.jsonl")
    assert [(r["epoch"], r["complete"], r["step"]) for r in rows] == [(1, True, 44), (2, False, 50)]
    for r in rows:
        for k in ("train_loss", "train_acc", "test_loss", "test_acc", "images_per_s", "peak_mem_mib"):
            assert np.isfinite(r[k]), k
    csv_lines = (out / "log.csv").read_text().splitlines()
    assert csv_lines[0].split(",") == loop.LOG_FIELDS and len(csv_lines) == 3
    ck = load_ckpt(out)
    assert (ck["epoch"], ck["batch_in_epoch"], ck["global_step"]) == (1, 6, 50)
    assert ck["optimizer"]["state"][0]["step"].item() == 50 and ck["scheduler"]["last_epoch"] == 50
    assert json.loads((out / "summary.json").read_text())["steps"] == 50
    assert json.loads((out / "config.json").read_text())["model"] == TINY


def test_resume_equals_uninterrupted_run(tmp_path):
    args = ("--epochs", "2")
    full = cli.run(tiny(tmp_path / "full", *args))
    part = tmp_path / "part"
    cli.run(tiny(part, *args, "--max-steps", "30"))  # stops in the middle of epoch 1
    ck = load_ckpt(part)
    assert (ck["epoch"], ck["batch_in_epoch"], ck["global_step"]) == (0, 30, 30)
    cli.run(tiny(part, *args, "--max-steps", "44", "--resume"))  # continues to the epoch boundary
    ck = load_ckpt(part)
    assert (ck["epoch"], ck["batch_in_epoch"], ck["global_step"]) == (1, 0, 44)
    assert ck["optimizer"]["state"][0]["step"].item() == 44
    resumed = cli.run(tiny(part, *args, "--resume"))
    assert resumed["resumed_from"] and resumed["steps"] == full["steps"] == 88

    a, b = load_ckpt(tmp_path / "full"), load_ckpt(part)
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for i, st in a["optimizer"]["state"].items():
        for k, v in st.items():
            assert torch.equal(v, b["optimizer"]["state"][i][k]), (i, k)
    assert a["scheduler"] == b["scheduler"]
    ra, rb = read_jsonl(tmp_path / "full" / "log.jsonl"), read_jsonl(part / "log.jsonl")
    assert len(ra) == len(rb) == 2
    for x, y in zip(ra, rb):
        for k in ("epoch", "step", "lr", "train_loss", "train_acc", "test_loss", "test_acc", "images"):
            assert x[k] == pytest.approx(y[k], rel=1e-12), k
    assert full["final_test_acc"] == resumed["final_test_acc"]
    # resuming a finished run does nothing; other settings are refused
    assert cli.run(tiny(part, *args, "--resume"))["steps"] == 88
    with pytest.raises(UsageError, match="other settings"):
        cli.run(tiny(part, *args, "--resume", "--batch-size", "16"))
    with pytest.raises(UsageError, match="no checkpoint"):
        cli.run(tiny(tmp_path / "none", *args, "--resume"))


def test_amp_bf16_on_cpu(tmp_path):
    TinySNN.seen_dtypes.clear()
    s = cli.run(tiny(tmp_path / "bf16", "--epochs", "1", "--max-steps", "3", "--amp", "bf16"))
    assert torch.bfloat16 in TinySNN.seen_dtypes  # autocast ran the convs in bf16
    assert np.isfinite(s["final_test_loss"]) and s["steps"] == 3
    assert load_ckpt(tmp_path / "bf16")["scaler"] is None  # no GradScaler off CUDA


def test_ddp_two_processes_equal_one_process(tmp_path):
    """torchrun with 2 CPU processes (gloo, 2 x 16 images) ends with the parameters of one process
    on the same 32-image batches. The model normalises per sample (GroupNorm): with BatchNorm the
    statistics would be per process under DDP (torch's SyncBatchNorm refuses CPU tensors)."""
    args = tiny(tmp_path / "ddp", "--epochs", "1", "--max-steps", "6", "--warmup-epochs", "0", model=TINY_NOBN)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(TESTS / "tiny_models.py"), *args], capture_output=True, text=True, cwd=tmp_path, env=env,
                       timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stdout.count("epoch 1/1") == 1  # only rank 0 prints
    single = cli.run(tiny(tmp_path / "one", "--epochs", "1", "--max-steps", "6", "--warmup-epochs", "0", model=TINY_NOBN))
    ddp, one = load_ckpt(tmp_path / "ddp"), load_ckpt(tmp_path / "one")
    assert ddp["world_size"] == 2 and len(ddp["rng"]) == 2 and ddp["global_step"] == one["global_step"] == 6

    from spikeops.models import create_model

    torch.manual_seed(0)
    init = create_model(TINY_NOBN, num_classes=10, img_size=8, in_channels=3, T=2).state_dict()
    for k, v in one["model"].items():
        assert not torch.allclose(v, init[k]), f"{k} did not train"
        torch.testing.assert_close(ddp["model"][k], v, rtol=2e-6, atol=2e-7, msg=k)  # seen: <= 5e-8
    rd = read_jsonl(tmp_path / "ddp" / "log.jsonl")[-1]
    ro = read_jsonl(tmp_path / "one" / "log.jsonl")[-1]
    assert rd["images"] == ro["images"] == 6 * 32
    assert rd["train_loss"] == pytest.approx(ro["train_loss"], rel=1e-5)
    assert rd["test_acc"] == pytest.approx(ro["test_acc"]) and single["final_test_acc"] == pytest.approx(ro["test_acc"])


# --------------------------------------------------------------------- pretrain / finetune
def test_pretrain_needs_spikformer_v2(tmp_path):
    with pytest.raises(UsageError, match="spikformer_v2"):
        cli.run(tiny(tmp_path / "pt", "--mode", "pretrain"))


def test_pretrain_then_finetune(tmp_path):
    """Masked pre-training of a (shrunk) Spikformer V2 writes encoder.pt; fine-tuning loads it and
    reports the classifier head as the only missing keys."""
    from spikeops.models import MaskedPretrainer  # noqa: F401  (fails loudly if it is missing)

    small = ["--model", "spikformer_v2_8_384", "--model-arg", "depth=1", "--model-arg", "dim=32",
             "--model-arg", "num_heads=2", "--img-size", "32", "--batch-size", "8", "--epochs", "1",
             "--no-progress"]
    s = cli.run([*small, "--max-steps", "2", "--mode", "pretrain", "--out", str(tmp_path / "pt")])
    assert s["steps"] == 2 and np.isfinite(s["final_test_loss"]) and s["final_test_acc"] is None
    enc = torch.load(tmp_path / "pt" / "encoder.pt", map_location="cpu", weights_only=True)
    assert enc and not any(k.startswith("head.") for k in enc)
    assert load_ckpt(tmp_path / "pt")["config"]["T"] == 1  # pre-training runs at T=1

    # the masks come from the global RNG: a run stopped after 1 step and resumed equals the 2-step run
    cli.run([*small, "--max-steps", "1", "--mode", "pretrain", "--out", str(tmp_path / "pt_part")])
    cli.run([*small, "--max-steps", "2", "--mode", "pretrain", "--out", str(tmp_path / "pt_part"), "--resume"])
    enc2 = torch.load(tmp_path / "pt_part" / "encoder.pt", map_location="cpu", weights_only=True)
    assert all(torch.equal(enc[k], enc2[k]) for k in enc)

    s = cli.run([*small, "--max-steps", "2", "--mode", "finetune", "--T", "1", "--checkpoint", str(tmp_path / "pt" / "encoder.pt"),
                 "--out", str(tmp_path / "ft")])
    fi = s["finetune"]
    assert fi["unexpected_keys"] == [] and fi["missing_keys"] and all(k.startswith("head.") for k in fi["missing_keys"])
    assert fi["loaded"] == len(enc)
    ft = load_ckpt(tmp_path / "ft")["model"]
    # the loaded encoder tensors moved only by the 2 fine-tuning steps (lr is tiny during warm-up)
    k = next(k for k, v in enc.items() if v.is_floating_point() and v.dim() > 1)
    torch.testing.assert_close(ft[k], enc[k], rtol=0, atol=1e-3)


def test_sync_bn_needs_cuda_and_finds_functional_batchnorm():
    from spikeops.train import modeling

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.BatchNorm1d(3), torch.nn.BatchNorm1d(3)

        def forward(self, x):  # b is applied functionally, as fused kernels do
            b = self.b
            return torch.nn.functional.batch_norm(self.a(x), b.running_mean, b.running_var, b.weight, b.bias, True)

    with pytest.raises(UsageError, match="needs CUDA"):
        modeling.convert_sync_bn(Net(), torch.device("cpu"))
    net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(Net())  # conversion itself works on CPU
    check = modeling.SyncBNCheck(net)
    net(torch.randn(4, 3))  # no process group: SyncBatchNorm falls back to batch_norm
    assert check.finish() == ["b"]
