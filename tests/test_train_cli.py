"""train.py before any process starts: finding configs, overrides, resolvers, and one-line errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from omegaconf import OmegaConf

from tests.trainer_fakes import full_config
from training.engine.config import ConfigError, compose_config, find_config_file
from training.engine.launch import submitit_job_parameters, under_torchrun
from training.train import main
from training.utils.train_utils import register_omegaconf_resolvers

SHIPPED = Path(__file__).resolve().parent.parent / "sam2" / "configs" / "sam2.1_training"


def run_main(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def fake_run_config(tmp_path: Path, **trainer_changes) -> Path:
    config = full_config(str(tmp_path / "run"), **trainer_changes)
    path = tmp_path / "my_run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize(
    "name",
    [
        "sam2.1_training/custom_finetune",
        "sam2.1_training/custom_finetune.yaml",
        "configs/sam2.1_training/sam2.1_hiera_b+_MOSE_finetune.yaml",
        "configs/sam2.1_training/sam2.1_hiera_b+_MOSE_finetune",
    ],
)
def test_shipped_config_names_resolve(name):
    path = find_config_file(name)
    assert path.parent == SHIPPED and path.suffix == ".yaml"


def test_users_configs_dir_and_yaml_paths_resolve(tmp_path, monkeypatch):
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "my_run.yaml").write_text("a: 1\n")
    monkeypatch.chdir(tmp_path)
    assert find_config_file("my_run") == (tmp_path / "configs" / "my_run.yaml").resolve()
    assert find_config_file("my_run.yaml") == (tmp_path / "configs" / "my_run.yaml").resolve()
    other = tmp_path / "elsewhere.yaml"
    other.write_text("a: 2\n")
    assert find_config_file(str(other)) == other.resolve()


def test_user_config_can_extend_a_shipped_one(tmp_path, monkeypatch):
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "mine.yaml").write_text(
        "# @package _global_\ndefaults:\n  - /sam2.1_training/custom_finetune\n  - _self_\nscratch:\n  base_lr: 1.0e-5\n"
    )
    monkeypatch.chdir(tmp_path)
    cfg, _ = compose_config("mine", ["model_size=tiny", "scratch.num_epochs=3"])
    assert cfg.scratch.base_lr == 1e-5 and cfg.trainer.max_epochs == 3
    assert cfg.model.image_encoder.trunk.embed_dim == 96  # tiny
    assert cfg.trainer.model.image_encoder.trunk.embed_dim == 96


def test_custom_finetune_keeps_the_seed_defaults():
    cfg, _ = compose_config("sam2.1_training/custom_finetune")
    scratch = cfg.scratch
    assert (scratch.resolution, scratch.train_batch_size, scratch.num_train_workers) == (1024, 1, 2)
    assert (scratch.num_frames, scratch.max_num_objects, scratch.num_epochs, scratch.base_lr) == (1, 3, 10, 5.0e-6)
    assert cfg.dataset.img_folder == "/workspace/dataset/images"
    assert cfg.dataset.gt_folder == "/workspace/dataset/masks" and cfg.dataset.file_list_txt is None
    assert cfg.launcher.gpus_per_node == 1 and cfg.trainer.checkpoint.resume_from is None
    weights = cfg.trainer.checkpoint.model_weight_initializer.state_dict.checkpoint_path
    assert weights == "/checkpoints/sam2.1_hiera_base_plus.pt"
    assert cfg.trainer.model.image_encoder.trunk.embed_dim == 112  # base_plus
    large, _ = compose_config("sam2.1_training/custom_finetune", ["model_size=large"])
    assert large.trainer.model.image_encoder.trunk.embed_dim == 144
    assert large.trainer.checkpoint.model_weight_initializer.state_dict.checkpoint_path.endswith("large.pt")


def test_print_config_shows_the_resolved_config_with_overrides(capsys):
    code, out, _ = run_main(capsys, "-c", "sam2.1_training/custom_finetune", "--print-config", "scratch.base_lr=1e-5")
    assert code == 0
    printed = OmegaConf.create(out)
    assert printed.scratch.base_lr == 1e-5
    assert printed.trainer.optim.options.lr[0].scheduler.start_value == 1e-5
    assert printed.trainer.max_epochs == 10
    assert printed.launcher.experiment_log_dir.endswith(os.path.join("sam2_logs", "custom_finetune"))


@pytest.mark.parametrize(
    "args, message",
    [
        (["-c", "sam2.1_training/no_such"], "config 'sam2.1_training/no_such' not found"),
        (["-c", "sam2.1_training/custom_finetune", "scratch.base_lrr=1"], "Could not override 'scratch.base_lrr'"),
        (["-c", "sam2.1_training/custom_finetune"], "dataset.img_folder is '/workspace/dataset/images', which does not exist"),
        (["-c", "configs/sam2.1_training/sam2.1_hiera_b+_MOSE_finetune"], "dataset.img_folder is not set"),
        (["-c", "sam2.1_training/custom_finetune", "--num-gpus", "64"], "--num-gpus 64 asks for 64 GPUs"),
    ],
)
def test_bad_invocations_give_one_readable_line(capsys, args, message):
    code, _, err = run_main(capsys, *args)
    assert code == 2
    assert message in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_bad_config_contents_name_the_key(tmp_path, capsys):
    images = tmp_path / "data"
    images.mkdir()
    base = ["--num-gpus", "0", f"dataset.img_folder={images}", f"dataset.gt_folder={images}"]
    cases = [
        (["model.image_encoder.trunk._target_=sam2.modeling.nothing.Hiera"], "cannot be imported"),
        (["+model.image_encoder.trunk.embed_dimm=3"], "has key(s) ['embed_dimm']"),
        (["+model.use_high_res_features_in_sammm=true"], "did you mean 'use_high_res_features_in_sam'?"),
        (["scratch.checkpoint_dir=/nowhere"], "(= ${scratch.checkpoint_dir}/${scratch.model_weights}) is '/nowhere/"),
        (["scratch.checkpoint_dir=/nowhere"], "or override scratch.checkpoint_dir"),
        (["trainer.checkpoint.resume_from=/nowhere/checkpoint.pt"], "trainer.checkpoint.resume_from is '/nowhere/checkpoint.pt'"),
        (["scratch.base_lr=${scratch.nothing}"], "cannot resolve key"),
    ]
    for overrides, message in cases:
        code, _, err = run_main(capsys, "-c", "sam2.1_training/custom_finetune", *base, *overrides)
        assert code == 2 and message in err, (overrides, err)
        assert len(err.strip().splitlines()) == 1


def test_resolvers_are_the_official_ones():
    register_omegaconf_resolvers()
    register_omegaconf_resolvers()  # idempotent: every process may call it again
    cfg = OmegaConf.create(
        {
            "a": 6, "b": 4,
            "add": "${add:${a},${b}}", "times": "${times:${a},${b},2}", "divide": "${divide:${a},${b}}",
            "pow": "${pow:${b},2}", "subtract": "${subtract:${a},${b}}", "range": "${range:3}",
            "int": "${int:2.7}", "ceil_int": "${ceil_int:2.1}", "merge": "${merge:{x: 1},{y: 2}}",
            "cls": "${get_class:torch.nn.Linear}", "method": "${get_method:torch.zeros}",
        }
    )
    assert (cfg.add, cfg.times, cfg.divide, cfg.pow, cfg.subtract) == (10, 48, 1.5, 16, 2)
    assert list(cfg.range) == [0, 1, 2] and cfg.int == 2 and cfg.ceil_int == 3
    assert dict(cfg.merge) == {"x": 1, "y": 2}
    assert cfg.cls is torch.nn.Linear and cfg.method is torch.zeros


def test_torchrun_is_detected_from_its_environment(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert not under_torchrun()
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert not under_torchrun()
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert under_torchrun()


def test_submitit_parameters_follow_the_official_keys():
    cfg = OmegaConf.create(full_config("/tmp/x"))
    cfg.trainer.accelerator = "cuda"
    cfg.launcher.update(num_nodes=2, gpus_per_node=8)
    cfg.submitit.update(
        partition="gpu", account="acc", qos="high", cpus_per_task=10, timeout_hour=2, name=None,
        mem_gb=300, constraints="volta32gb", exclude_nodes=["n1", "n2"], include_nodes=["n3", "n4"],
        srun_args={"cpu_bind": "none"},
    )
    params = submitit_job_parameters(cfg, "my_run")
    assert params["timeout_min"] == 120 and params["name"] == "my_run"
    assert params["slurm_partition"] == "gpu" and params["nodes"] == 2
    assert params["gpus_per_node"] == 8 and params["tasks_per_node"] == 8 and params["cpus_per_task"] == 10
    assert params["mem_gb"] == 300 and params["slurm_constraint"] == "volta32gb"
    assert params["slurm_srun_args"] == ["--cpu-bind", "none"]
    assert params["slurm_additional_parameters"] == {"exclude": "n1 n2", "nodelist": "n3 n4", "account": "acc", "qos": "high"}


def test_print_config_of_a_yaml_path_uses_its_stem_for_the_run_dir(tmp_path, capsys, monkeypatch):
    path = fake_run_config(tmp_path)
    config = yaml.safe_load(path.read_text())
    config["launcher"]["experiment_log_dir"] = None
    path.write_text(yaml.safe_dump(config))
    monkeypatch.chdir(tmp_path)
    code, out, _ = run_main(capsys, "-c", str(path), "--print-config", "--num-gpus", "0")
    assert code == 0
    assert OmegaConf.create(out).launcher.experiment_log_dir == str(tmp_path / "sam2_logs" / "my_run")
    with pytest.raises(ConfigError):
        find_config_file(str(tmp_path / "missing.yaml"))


def test_the_trainer_loads_pandas_only_to_evaluate():
    """pandas (about 30 MB resident) builds evaluation tables; a run that never evaluates skips it."""
    code = "import sys, training.train, training.trainer, training.engine.validation_hook; print('pandas' in sys.modules)"
    repo = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "False"
