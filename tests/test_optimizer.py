from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from tests.reference import REPO_ROOT, assert_close
from training.optimizer import GradientClipper, construct_optimizer
from training.utils.train_utils import register_omegaconf_resolvers

# A stand-in with the SAM 2 naming that the optim configs rely on (a Hiera-like trunk with
# `blocks`, `pos_embed`, `get_layer_id`; LayerNorms; biases). Executed here and in the reference
# process, so both sides build the same classes.
MODEL_SRC = """
import torch
from torch import nn

class Block(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

class Trunk(nn.Module):
    def __init__(self, dim=8, depth=3):
        super().__init__()
        self.pos_embed = nn.Parameter(torch.zeros(1, dim, 4, 4))
        self.pos_embed_window = nn.Parameter(torch.zeros(1, dim, 2, 2))
        self.patch_embed = nn.Conv2d(3, dim, 2, stride=2)
        self.blocks = nn.ModuleList(Block(dim) for _ in range(depth))

    def get_num_layers(self):
        return len(self.blocks)

    def get_layer_id(self, name):
        if "pos_embed" in name or "patch_embed" in name:
            return 0
        if "blocks" in name:
            return int(name.split("blocks")[1].split(".")[1]) + 1
        return self.get_num_layers() + 1

class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.trunk = Trunk()
        self.neck = nn.Conv2d(8, 8, 1)

class TinyModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.image_encoder = Encoder()
        self.no_mem_embed = nn.Parameter(torch.zeros(1, 1, 8))
        self.sam_mask_decoder = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8))
        self.obj_ptr_proj = nn.Linear(8, 8)

    def forward(self, x):
        feats = self.image_encoder.neck(self.image_encoder.trunk.patch_embed(x) + self.image_encoder.trunk.pos_embed)
        tokens = feats.flatten(2).transpose(1, 2) + self.no_mem_embed
        for block in self.image_encoder.trunk.blocks:
            tokens = tokens + block.mlp(block.attn(block.norm1(tokens)))
        tokens = tokens + self.image_encoder.trunk.pos_embed_window.mean()
        return self.obj_ptr_proj(self.sam_mask_decoder(tokens)).square().mean()
"""

MOSE_RELPATH = "sam2/configs/sam2.1_training/sam2.1_hiera_b+_MOSE_finetune.yaml"
# Ours reads our copy of the official config, the reference process reads its own.
MOSE_CONFIG = REPO_ROOT / MOSE_RELPATH

# The `optim` section of a training config, resolved (run in both processes).
LOAD_OPTIM_SRC = """
from omegaconf import OmegaConf

def load_optim(path):
    for name, fn in {"divide": lambda a, b: a / b, "times": lambda a, b: a * b}.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)
    return OmegaConf.to_container(OmegaConf.load(path).trainer.optim, resolve=True)
"""

NO_DEFAULT_LR_OPTIM = {
    "optimizer": {"_target_": "torch.optim.AdamW", "lr": 1e-3},
    "options": {
        "lr": [
            {
                "scheduler": {"_target_": "fvcore.common.param_scheduler.LinearParamScheduler", "start_value": 0.1, "end_value": 0.01},
                "param_names": ["sam_mask_decoder.*", "obj_ptr_proj.*"],
            }
        ],
        "weight_decay": [
            {"scheduler": {"_target_": "fvcore.common.param_scheduler.ConstantParamScheduler", "value": 0.05}},
            {
                "scheduler": {"_target_": "fvcore.common.param_scheduler.ConstantParamScheduler", "value": 0.0},
                "module_cls_names": ["torch.nn.LayerNorm"],
            },
        ],
    },
    "param_group_modifiers": None,
}

WHERES = [(0.0, 0), (0.25, 5), (0.5, 10), (0.97, 19)]


def _tiny_model():
    namespace: dict = {}
    exec(MODEL_SRC, namespace)
    torch.manual_seed(0)
    return namespace["TinyModel"]()


def _mose_optim() -> dict:
    register_omegaconf_resolvers()  # ours, not the snippet's two-argument stand-ins
    namespace: dict = {}
    exec(LOAD_OPTIM_SRC, namespace)
    return namespace["load_optim"](MOSE_CONFIG)


def _describe(model, optim) -> dict:
    """Group membership by name, and every group's lr / weight decay at each WHERES point."""
    names = {id(p): n for n, p in model.named_parameters()}
    groups = [[names[id(p)] for p in g["params"]] for g in optim.optimizer.param_groups]
    values = []
    for where, step in WHERES:
        optim.step_schedulers(where, step)
        values.append(torch.tensor([[g["lr"], g["weight_decay"]] for g in optim.optimizer.param_groups], dtype=torch.float64))
    return {"groups": groups, "values": values}


@pytest.fixture(scope="module")
def ref_out(reference):
    return reference.run(
        LOAD_OPTIM_SRC
        + """
import os
import sam2
from training.optimizer import construct_optimizer
root = os.path.dirname(os.path.dirname(sam2.__file__))
optims = {**inputs["optims"], "mose": load_optim(os.path.join(root, inputs["mose_relpath"]))}
namespace = {}
exec(inputs["model_src"], namespace)
for key, optim in optims.items():
    model = namespace["TinyModel"]()
    conf = OmegaConf.create(optim)
    built = construct_optimizer(model, conf.optimizer, conf.options, conf.param_group_modifiers)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = [[names[id(p)] for p in g["params"]] for g in built.optimizer.param_groups]
    values = []
    for where, step in inputs["wheres"]:
        built.step_schedulers(where, step)
        values.append(torch.tensor([[g["lr"], g["weight_decay"]] for g in built.optimizer.param_groups], dtype=torch.float64))
    outputs[key] = {"groups": groups, "values": values}
""",
        model_src=MODEL_SRC,
        optims={"no_default_lr": NO_DEFAULT_LR_OPTIM},
        mose_relpath=MOSE_RELPATH,
        wheres=WHERES,
    )


@pytest.mark.reference
@pytest.mark.parametrize("key", ["mose", "no_default_lr"])
def test_param_groups_and_schedules_match_reference(ref_out, key):
    optim_conf = OmegaConf.create(_mose_optim() if key == "mose" else NO_DEFAULT_LR_OPTIM)
    model = _tiny_model()
    optim = construct_optimizer(model, optim_conf.optimizer, optim_conf.options, optim_conf.param_group_modifiers)
    ours = _describe(model, optim)
    assert ours["groups"] == ref_out[key]["groups"]
    assert_close(ours["values"], ref_out[key]["values"], rtol=0, atol=0)


def test_layer_decay_gives_each_trunk_block_its_own_lr():
    optim_conf = OmegaConf.create(_mose_optim())
    model = _tiny_model()
    optim = construct_optimizer(model, optim_conf.optimizer, optim_conf.options, optim_conf.param_group_modifiers)
    names = {id(p): n for n, p in model.named_parameters()}
    lr_of = {names[id(p)]: g["lr"] for g in optim.optimizer.param_groups for p in g["params"]}
    vision_lr, base_lr = 3.0e-6, 5.0e-6
    # 3 blocks: num_layers = 4; block i gets 0.9 ** (4 - (i + 1)), the stem 0.9 ** 4, pos_embed 1.0.
    assert lr_of["image_encoder.trunk.blocks.2.attn.weight"] == pytest.approx(vision_lr * 0.9)
    assert lr_of["image_encoder.trunk.blocks.0.attn.weight"] == pytest.approx(vision_lr * 0.9**3)
    assert lr_of["image_encoder.trunk.patch_embed.weight"] == pytest.approx(vision_lr * 0.9**4)
    assert lr_of["image_encoder.trunk.pos_embed"] == pytest.approx(vision_lr)
    assert lr_of["image_encoder.neck.weight"] == pytest.approx(vision_lr)
    assert lr_of["sam_mask_decoder.0.weight"] == pytest.approx(base_lr)


@pytest.mark.parametrize("how", ["config_globs", "requires_grad"])
def test_frozen_parameters_stay_bit_identical_and_have_no_state(how):
    optim_conf = OmegaConf.create(_mose_optim())
    model = _tiny_model()
    if how == "requires_grad":
        for p in model.image_encoder.parameters():
            p.requires_grad_(False)
        frozen_globs = None
    else:
        frozen_globs = ["image_encoder.*"]
    optim = construct_optimizer(
        model, optim_conf.optimizer, optim_conf.options, optim_conf.param_group_modifiers, frozen_param_names=frozen_globs
    )
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    for step in range(3):
        optim.zero_grad(set_to_none=True)
        model(x).backward()
        GradientClipper(max_norm=0.1)(model)
        optim.step(where=step / 10, step=step)

    in_optimizer = {id(p) for g in optim.optimizer.param_groups for p in g["params"]}
    for name, param in model.named_parameters():
        if name.startswith("image_encoder."):
            assert not param.requires_grad and param.grad is None
            assert id(param) not in in_optimizer and param not in optim.optimizer.state
            assert torch.equal(param, before[name]), name
        else:
            assert id(param) in in_optimizer
            assert not torch.equal(param, before[name]), name


def test_gradient_clipper_caps_the_global_norm():
    model = _tiny_model()
    model(torch.randn(2, 3, 8, 8)).backward()
    for p in model.parameters():
        p.grad.mul_(1e3)
    norm_before = GradientClipper(max_norm=0.5, norm_type=2)(model)
    assert norm_before > 0.5
    total = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
    assert total == pytest.approx(0.5, rel=1e-4)
    assert GradientClipper(max_norm=None)(model) is None
    with pytest.raises(ValueError, match="max_norm"):
        GradientClipper(max_norm="big")


def test_config_errors_name_the_offending_entry():
    model = _tiny_model()
    options = {"lr": [{"scheduler": {"_target_": "fvcore.common.param_scheduler.ConstantParamScheduler", "value": 1.0}, "param_names": ["decoder_typo.*"]}]}
    with pytest.raises(ValueError, match="decoder_typo"):
        construct_optimizer(model, {"_target_": "torch.optim.AdamW"}, options)
    with pytest.raises(ValueError, match="matches no parameter"):
        construct_optimizer(model, {"_target_": "torch.optim.AdamW"}, frozen_param_names=["nothing.*"])


def test_explicit_foreach_or_fused_choice_is_kept():
    model = _tiny_model()
    optim = construct_optimizer(model, {"_target_": "torch.optim.AdamW", "foreach": False})
    assert optim.optimizer.defaults["foreach"] is False and not optim.optimizer.defaults["fused"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (the CPU fused path is tested in test_fast_paths.py)")
def test_fused_adamw_on_cuda():
    model = _tiny_model().cuda()
    optim_conf = OmegaConf.create(_mose_optim())
    optim = construct_optimizer(model, optim_conf.optimizer, optim_conf.options, optim_conf.param_group_modifiers)
    assert optim.optimizer.defaults["fused"] is True
    model(torch.randn(2, 3, 8, 8, device="cuda")).backward()
    optim.step(where=0.1, step=1)
