import json
import subprocess
import sys

from m3i.cli import main


def test_demo_runs_the_main_job_end_to_end(tmp_path, capsys, monkeypatch):
    from tests.helpers import train_env
    from tests.prometheus import free_port_pair

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", train_env()["TORCH_EXTENSIONS_DIR"])
    # two ranks: the demo preset trains in one, the demo must carry any count
    argv = ["-q", "demo", "--workdir", str(tmp_path / "w"), "--set", "data.batch_size=64", "--set", "train.steps=3",
            "--set", "launch.nproc_per_node=2"]
    argv += ["--set", f"launch.metrics_port={free_port_pair()}"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "[1/4] demo data" in out and "[2/4] shards" in out and "[3/4] loader" in out and "[4/4] train" in out
    index = json.loads((tmp_path / "w" / "shards" / "index.json").read_text())
    train = index["splits"]["train"]
    assert train["samples"] == 3600 and index["totals"]["samples"] == 3960  # DemoCounts: 1800 + 1200 + 600, 360 held out
    assert f"{train['samples']:7d} samples in {len(train['shards'])} shards" in out
    assert "56 batches x 64 = 3584 images" in out and "images/s" in out  # one epoch on one process, last partial batch dropped
    assert "3 steps on 2 ranks" in out and "loss_img=" in out
    assert (tmp_path / "w" / "run" / "checkpoints" / "step-00000003" / "complete.json").exists()


def test_demo_data_and_shard_subcommands(tmp_path, capsys):
    raw = tmp_path / "raw"
    assert main(["demo-data", "--out", str(raw), "--size", "32"]) == 0
    assert main(["-q", "shard", "--labelled", str(raw / "labelled"), "--out", str(tmp_path / "s"), "--eval-fraction", "0.1"]) == 0
    out = capsys.readouterr().out
    assert "eval" in out and "labelled" in out
    index = json.loads((tmp_path / "s" / "index.json").read_text())
    assert index["config"]["eval_fraction"] == 0.1 and index["splits"]["eval"]["samples"] > 0


def test_shard_inputs_on_the_command_line_replace_the_presets(tmp_path, capsys, monkeypatch):
    # The demo preset names the demo's own folders; a user's --labelled must not be mixed with them
    # (nor fail because they are missing), while an input kind set with --set is kept.
    raw = tmp_path / "raw"
    assert main(["demo-data", "--out", str(raw), "--size", "32"]) == 0
    monkeypatch.chdir(tmp_path)  # no m3i-data/raw here
    argv = ["-q", "shard", "--preset", "demo", "--labelled", str(raw / "labelled"), "--out", "s",
            "--set", f"shard.unlabelled={json.dumps([str(raw / 'unlabelled')])}"]
    assert main(argv) == 0, capsys.readouterr().err
    index = json.loads((tmp_path / "s" / "index.json").read_text())
    assert set(index["totals"]["sources"]) == {"labelled", "unlabelled"}
    assert index["config"]["captions"] == [] and index["config"]["eval_labelled"] == []


def test_bad_value_exits_2_with_one_clear_line(tmp_path, capsys):
    code = main(["shard", "--unlabelled", str(tmp_path), "--set", "shard.jpeg_quality=0"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip() == "m3i shard: error: shard.jpeg_quality=0 is out of range; allowed [1, 100]"


def test_storage_failure_exits_1(tmp_path, capsys, monkeypatch):
    from tests.conftest import free_port

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("M3I_S3_RETRIES", "2")
    monkeypatch.setenv("M3I_S3_BACKOFF", "0.01")
    (tmp_path / "u").mkdir()
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "u" / "a.png")
    code = main(["-q", "shard", "--unlabelled", str(tmp_path / "u"), "--out", "s3://bucket/x"])
    assert code == 1
    assert "failed after 2 attempts" in capsys.readouterr().err


def test_console_entry_point():
    r = subprocess.run([sys.executable, "-m", "m3i", "--version"], capture_output=True, text=True, check=True)
    assert r.stdout.startswith("m3i ")
