"""A model's anatomy, in one place: its repeated blocks, every linear map inside them (nn.Linear and its
subclasses, GPT-2's Conv1D, and each expert of a fused mixture-of-experts tensor), the routers, the head
and whether it is tied, the embeddings. Stages that score, prune, quantize, cast, check or write weights
ask this module which layers there are instead of searching for nn.Linear themselves.

Fused experts. transformers 5 stores a mixture-of-experts layer's experts as two 3-D parameters
(`gate_up_proj` (E, 2I, H) and `down_proj` (E, H, I)) and dispatches them to grouped matmul kernels that
forward hooks never see. `open_for_compression` replaces each such module by `LinearExperts`: one
`gate_proj` / `up_proj` / `down_proj` nn.Linear per expert, computing the same function with the eager
loop. Every per-layer method (magnitude, Wanda, SparseGPT, GPTQ, AWQ, RTN, int8) then reaches each expert
as a layer of its own, with its own statistics, and the per-expert names are the ones Hugging Face
checkpoints and vLLM's compressed-tensors loader use (`mlp.experts.3.gate_proj`). (llm-compressor
linearizes on load the same way; quantizing the fused tensors in place would need a fused variant of
every method and every packed layer.) `restore_layout` stacks the experts back before a float model is
saved with save_pretrained, so the checkpoint loads in the model's own class.

A parameter of three or more dimensions that is none of these (an expert layout with biases and a
clamped gate, say) is refused with the architecture named: it is never skipped."""

from __future__ import annotations

import fnmatch
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Optional

from .errors import UserError
from .linear_layers import conv1d_to_linear, is_linear_like, linear_to_conv1d

# Children of a mixture-of-experts block that are experts rather than routing: the routed experts and
# the always-on shared expert(s). Every other child there (`gate`, `shared_expert_gate`) routes.
EXPERT_CHILDREN = ("experts", "shared_expert", "shared_experts")

# Where a family's checkpoints on the hub (and so vLLM's loaders and transformers' own conversion on load)
# name each expert's layers, when that differs from the linearized module names (`mlp.experts.3.gate_proj`,
# the qwen2_moe / qwen3_moe / deepseek / olmoe layout): (module prefix, checkpoint prefix, layer renames).
EXPERT_CHECKPOINT_NAMES = {
    "mixtral": (".mlp.experts.", ".block_sparse_moe.experts.", {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}),
}

# An expert the router chose for fewer calibration tokens than this is flagged in the stage record: its
# statistics rest on the tokens it was sent only because every expert sees every token while calibrating.
MIN_EXPERT_TOKENS = 16


def fused_experts_layout(module) -> Optional[str]:
    """Which of transformers 5's fused expert layouts `module` holds, or None:
    - "concatenated": gate_up_proj (E, 2I, H) as [gate; up] and down_proj (E, H, I), (out, in) per expert,
      no biases, act_fn(gate) * up (Qwen-MoE, Mixtral, DeepSeek, OLMoE);
    - "interleaved": GPT-OSS's gate_up_proj (E, H, 2I) with gate and up in alternate columns and down_proj
      (E, I, H), (in, out) per expert, biases on both, and its clamped SwiGLU (up + 1) * gate * sigmoid(alpha
      gate) with alpha and limit."""
    import torch

    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    if not (isinstance(gate_up, torch.nn.Parameter) and isinstance(down, torch.nn.Parameter)
            and gate_up.ndim == 3 and down.ndim == 3 and gate_up.shape[0] == down.shape[0]):
        return None
    biases = getattr(module, "gate_up_proj_bias", None), getattr(module, "down_proj_bias", None)
    if (hasattr(module, "act_fn") and biases == (None, None)
            and gate_up.shape[1] == 2 * down.shape[2] and gate_up.shape[2] == down.shape[1]
            # the flags transformers' experts dispatch sets: [gate; up] concatenated, (out, in) per expert
            and getattr(module, "is_concatenated", True) and not getattr(module, "is_transposed", False)
            and not getattr(module, "has_bias", False) and getattr(module, "has_gate", True)
            and not getattr(module, "has_post_expert_norm", False)):
        return "concatenated"
    if (type(module).__name__ == "GptOssExperts" and all(isinstance(b, torch.nn.Parameter) for b in biases)
            and hasattr(module, "alpha") and hasattr(module, "limit")
            and gate_up.shape[2] == 2 * down.shape[1] and gate_up.shape[1] == down.shape[2]):
        return "interleaved"
    return None


# The tensors of each fused layout, as the module (and a checkpoint storing them fused) names them
FUSED_EXPERT_TENSORS = {"concatenated": ("gate_up_proj", "down_proj"),
                        "interleaved": ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias")}


def split_fused_experts(tensors: dict, layout: str) -> list[dict]:
    """Per expert, its layers' tensors as nn.Linear holds them ((out, in); `gate_proj.weight`, ...,
    GPT-OSS's biases), from a fused module's (FUSED_EXPERT_TENSORS)."""
    gate_up, down = tensors["gate_up_proj"], tensors["down_proj"]
    if layout == "concatenated":  # gate_up (E, 2I, H) as [gate; up], down (E, H, I)
        half = gate_up.shape[1] // 2
        return [{"gate_proj.weight": gate_up[e][:half], "up_proj.weight": gate_up[e][half:],
                 "down_proj.weight": down[e]} for e in range(gate_up.shape[0])]
    bias, down_bias = tensors["gate_up_proj_bias"], tensors["down_proj_bias"]  # (E, H, 2I) alternating, (E, I, H)
    return [{"gate_proj.weight": gate_up[e][:, ::2].T, "up_proj.weight": gate_up[e][:, 1::2].T,
             "gate_proj.bias": bias[e][::2], "up_proj.bias": bias[e][1::2],
             "down_proj.weight": down[e].T, "down_proj.bias": down_bias[e]} for e in range(gate_up.shape[0])]


def fuse_expert_tensors(experts: list[dict], layout: str) -> dict:
    """The fused module's tensors from its experts' (split_fused_experts' inverse)."""
    import torch

    if layout == "concatenated":
        return {"gate_up_proj": torch.stack([torch.cat([e["gate_proj.weight"], e["up_proj.weight"]]) for e in experts]),
                "down_proj": torch.stack([e["down_proj.weight"] for e in experts])}
    gate_up = torch.stack([torch.stack([e["gate_proj.weight"].T, e["up_proj.weight"].T], -1).flatten(-2)
                           for e in experts])
    bias = torch.stack([torch.stack([e["gate_proj.bias"], e["up_proj.bias"]], -1).flatten(-2) for e in experts])
    return {"gate_up_proj": gate_up, "gate_up_proj_bias": bias,
            "down_proj": torch.stack([e["down_proj.weight"].T for e in experts]),
            "down_proj_bias": torch.stack([e["down_proj.bias"] for e in experts])}


def is_fused_experts(module) -> bool:
    return fused_experts_layout(module) is not None


def linear_experts_class():
    """The class of a linearized expert group (a factory, so torch loads on first use)."""
    import torch

    class ExpertMLP(torch.nn.Module):
        """One expert: down(act(gate(x)) * up(x))."""

        def __init__(self, hidden: int, intermediate: int, act_fn, dtype, device):
            super().__init__()
            self.gate_proj = torch.nn.Linear(hidden, intermediate, bias=False, dtype=dtype, device=device)
            self.up_proj = torch.nn.Linear(hidden, intermediate, bias=False, dtype=dtype, device=device)
            self.down_proj = torch.nn.Linear(intermediate, hidden, bias=False, dtype=dtype, device=device)
            self.act_fn = act_fn

        def forward(self, x):
            return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))

    class ClampedSwiGLUExpert(torch.nn.Module):
        """One GPT-OSS expert, with biases: down((clamp(up(x)) + 1) * g * sigmoid(alpha g)), g = gate(x) clamped
        from above, in GPT-OSS's own order of operations."""

        def __init__(self, hidden: int, intermediate: int, alpha: float, limit: float, dtype, device):
            super().__init__()
            self.gate_proj = torch.nn.Linear(hidden, intermediate, bias=True, dtype=dtype, device=device)
            self.up_proj = torch.nn.Linear(hidden, intermediate, bias=True, dtype=dtype, device=device)
            self.down_proj = torch.nn.Linear(intermediate, hidden, bias=True, dtype=dtype, device=device)
            self.alpha, self.limit = alpha, limit

        def forward(self, x):
            gate = self.gate_proj(x).clamp(min=None, max=self.limit)
            up = self.up_proj(x).clamp(min=-self.limit, max=self.limit)
            return self.down_proj((up + 1) * (gate * torch.sigmoid(gate * self.alpha)))

    def _expert(fused, layout: str, tensors: Optional[dict]):
        """One expert module of `fused`'s layout, holding `tensors` (split_fused_experts), or empty."""
        if layout == "concatenated":
            _, double_intermediate, hidden = fused.gate_up_proj.shape
            expert = ExpertMLP(hidden, double_intermediate // 2, fused.act_fn, fused.gate_up_proj.dtype,
                               fused.gate_up_proj.device)
        else:
            _, hidden, double_intermediate = fused.gate_up_proj.shape
            expert = ClampedSwiGLUExpert(hidden, double_intermediate // 2, fused.alpha, fused.limit,
                                         fused.gate_up_proj.dtype, fused.gate_up_proj.device)
        for key, tensor in (tensors or {}).items():  # an empty skeleton stays empty (loading fills it)
            expert.get_parameter(key).copy_(tensor)
        return expert

    class LinearExperts(torch.nn.ModuleList):
        """A fused expert module's function with one ExpertMLP per expert, called as the fused one is:
        (hidden (tokens, H), top_k_index (tokens, k), top_k_weights (tokens, k)).

        `calibrate_all` (set while a calibrated method records statistics) sends every token through
        every expert, so that each expert's layers are calibrated on the whole batch, while the output
        still sums only the router's top-k choices; `routed_tokens` counts, per expert, the tokens the
        router actually chose while `counting` is on."""

        def __init__(self, experts: list, fused_class: type, fused_attributes: dict, layout: str = "concatenated"):
            super().__init__(experts)
            self.num_experts = len(experts)
            self.layout = layout  # fused_experts_layout of the module it replaces
            self.calibrate_all = False
            self.counting = False
            self.routed_tokens = [0] * len(experts)
            # What restore_layout needs to rebuild the fused module (kept out of the module tree)
            self._fused = (fused_class, fused_attributes)

        @classmethod
        def from_fused(cls, fused):
            layout = fused_experts_layout(fused)
            with torch.no_grad():
                tensors = None if fused.gate_up_proj.is_meta else split_fused_experts(
                    {key: getattr(fused, key) for key in FUSED_EXPERT_TENSORS[layout]}, layout)
                experts = [_expert(fused, layout, tensors[index] if tensors else None)
                           for index in range(fused.gate_up_proj.shape[0])]
            # Plain attributes (sizes, config, the dispatch flags), not nn.Module's own bookkeeping
            bookkeeping = set(vars(torch.nn.Module()))
            attributes = {key: value for key, value in vars(fused).items() if key not in bookkeeping}
            if hasattr(fused, "act_fn"):
                attributes["act_fn"] = fused.act_fn
            return cls(experts, type(fused), attributes, layout)

        def to_fused(self):
            fused_class, attributes = self._fused
            fused = fused_class.__new__(fused_class)
            torch.nn.Module.__init__(fused)
            for key, value in attributes.items():
                setattr(fused, key, value)
            with torch.no_grad():
                state = [dict(expert.named_parameters()) for expert in self]
                for key, tensor in fuse_expert_tensors(state, self.layout).items():
                    setattr(fused, key, torch.nn.Parameter(tensor.contiguous()))
            return fused

        def forward(self, hidden_states, top_k_index, top_k_weights):
            output = torch.zeros_like(hidden_states)
            chosen = torch.nn.functional.one_hot(top_k_index, num_classes=self.num_experts)  # tokens, k, E
            for index, expert in enumerate(self):
                token_idx, top_k_pos = torch.where(chosen[..., index])
                if self.counting:
                    self.routed_tokens[index] += int(token_idx.numel())
                if self.calibrate_all:
                    computed = expert(hidden_states)[token_idx]
                elif token_idx.numel():
                    computed = expert(hidden_states[token_idx])
                else:
                    continue
                weighted = computed * top_k_weights[token_idx, top_k_pos, None]
                output.index_add_(0, token_idx, weighted.to(output.dtype))
            return output

    return LinearExperts


def is_linear_experts(module) -> bool:
    return type(module).__name__ == "LinearExperts" and hasattr(module, "to_fused")


@dataclass
class ExpertGroup:
    """One mixture-of-experts layer's routed experts, linearized."""

    name: str               # the LinearExperts module, e.g. model.layers.0.mlp.experts
    experts: int

    def expert_of(self, layer: str) -> Optional[int]:
        """Which expert a linear layer belongs to, or None when it is not one of this group's."""
        if not layer.startswith(self.name + "."):
            return None
        head = layer[len(self.name) + 1:].split(".", 1)[0]
        return int(head) if head.isdigit() else None


@dataclass
class Anatomy:
    """What one model is made of (names are module names in the model as opened for compression)."""

    architecture: str
    blocks_name: Optional[str]
    blocks: Any                                  # the nn.ModuleList of repeated blocks, or None
    linears: dict[str, Any]                      # every linear map, experts included
    expert_groups: list[ExpertGroup] = field(default_factory=list)
    routers: list[str] = field(default_factory=list)
    head: Optional[str] = None
    head_tied: bool = False
    embeddings: list[str] = field(default_factory=list)
    conv1d: list[str] = field(default_factory=list)   # linears that were GPT-2 Conv1D layers
    total_parameters: int = 0                          # each shared (tied) tensor once

    def in_blocks(self, name: str) -> bool:
        return self.blocks_name is not None and name.startswith(self.blocks_name + ".")

    def block_index(self, name: str) -> Optional[int]:
        if not self.in_blocks(name):
            return None
        head = name[len(self.blocks_name) + 1:].split(".", 1)[0]
        return int(head) if head.isdigit() else None

    def is_router(self, name: str) -> bool:
        return any(name == r or name.startswith(r + ".") for r in self.routers)

    def expert_group_of(self, name: str) -> Optional[ExpertGroup]:
        return next((g for g in self.expert_groups if g.expert_of(name) is not None), None)

    def tied_to_embedding(self, name: str) -> bool:
        """A linear whose weight is an embedding table (a tied head): changing it changes the lookup."""
        return self.head_tied and name == self.head

    def select(self, include: list[str], exclude: list[str], what: str, *, head: bool) -> dict[str, Any]:
        """The linear layers a stage changes: matching `include` (all when empty) and not `exclude`
        (shell patterns against the full name or its last part), never a router, the head only when
        `head` is true. Refused, naming what was asked, when nothing is left."""
        chosen = {name: layer for name, layer in self.linears.items()
                  if (not include or matches_any(name, include)) and not matches_any(name, exclude)
                  and not self.is_router(name) and (head or name != self.head)}
        if not chosen:
            raise UserError(f"{what}: no linear layer of this {self.architecture} model is left to change "
                            f"(include {include or ['*']}, exclude {exclude}); names look like "
                            f"{list(self.linears)[:3]}")
        return chosen

    def coverage(self, changed, excluded=()) -> dict:
        """What a stage's changes cover, for its record: the share of the model's parameters in the `changed`
        linears; of the blocks' linear weights (routers aside) the share changed and the share the recipe's
        own patterns left out (`excluded`); and, for a mixture-of-experts model, the experts' share of the
        model and the share of expert weights changed."""
        changed, excluded = set(changed), set(excluded)

        def size(names):
            return sum(self.linears[n].weight.numel() for n in names if n in self.linears)
        in_blocks = [n for n in self.linears if self.in_blocks(n) and not self.is_router(n)]
        block_total = max(size(in_blocks), 1)
        record = {"changed_parameter_share": round(size(changed) / max(self.total_parameters, 1), 4),
                  "block_weights_changed_share": round(size(n for n in in_blocks if n in changed) / block_total, 4),
                  "block_weights_excluded_share": round(size(n for n in in_blocks if n in excluded) / block_total, 4)}
        if self.expert_groups:
            experts = [n for n in self.linears if self.expert_group_of(n) is not None]
            record["expert_parameter_share"] = round(size(experts) / max(self.total_parameters, 1), 4)
            record["experts_changed_share"] = round(size(n for n in experts if n in changed) / max(size(experts), 1), 4)
        return record



def checkpoint_name(architecture: str, name: str) -> str:
    """The name a checkpoint of this family gives the linearized expert layer `name` (unchanged for layers
    that are not experts, and for families whose checkpoints use the module names)."""
    rename = EXPERT_CHECKPOINT_NAMES.get(architecture)
    if rename is None or rename[0] not in f".{name}":
        return name
    module_prefix, stored_prefix, layers = rename
    renamed = f".{name}".replace(module_prefix, stored_prefix, 1)[1:]
    head, _, last = renamed.rpartition(".")
    return f"{head}.{layers.get(last, last)}"


def expert_module_name(architecture: str, name: str) -> str:
    """The linearized expert tensor a checkpoint's per-expert tensor `name` is, once the family's own
    renaming has run (Mixtral's `...mlp.experts.3.w3.weight` -> `...mlp.experts.3.up_proj.weight`);
    other names unchanged."""
    rename = EXPERT_CHECKPOINT_NAMES.get(architecture)
    parts = name.split(".")
    if rename is None or len(parts) < 4 or parts[-4] != "experts" or not parts[-3].isdigit():
        return name
    module_layers = {stored: module for module, stored in rename[2].items()}
    parts[-2] = module_layers.get(parts[-2], parts[-2])
    return ".".join(parts)


def overrides_linear_forward(layer) -> bool:
    """An nn.Linear subclass computing with its own forward (Falcon's FalconLinear reads self.weight), which a
    loader that swaps Linear's weight for packed tensors cannot run."""
    import torch

    return isinstance(layer, torch.nn.Linear) and type(layer).forward is not torch.nn.Linear.forward


def has_submodule(module, path: str) -> bool:
    """Whether `module` holds a submodule at the dotted `path`."""
    try:
        module.get_submodule(path)
        return True
    except AttributeError:
        return False


def architecture_of(module) -> str:
    config = getattr(module, "config", None)
    return getattr(config, "model_type", None) or type(module).__name__


def _replace(module, name: str, new) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = module.get_submodule(parent_name) if parent_name else module
    setattr(parent, child, new)


def linearize_experts(module) -> list[str]:
    """Replace every fused expert module by LinearExperts, in place; returns their names."""
    linear_experts = linear_experts_class()
    fused = [name for name, child in module.named_modules() if is_fused_experts(child)]
    for name in fused:
        _replace(module, name, linear_experts.from_fused(module.get_submodule(name)))
    return fused


def _refuse_unknown_layouts(module) -> None:
    """Parameters of three or more dimensions outside convolutions and known expert layouts."""
    import torch

    for name, child in module.named_modules():
        if isinstance(child, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)) or is_linear_experts(child):
            continue
        for key, parameter in child.named_parameters(recurse=False):
            if parameter.ndim >= 3:
                raise UserError(
                    f"{architecture_of(module)}: {name}.{key} ({type(child).__name__}, shape "
                    f"{tuple(parameter.shape)}) is a fused layout compress does not know (known: experts as "
                    "gate_up_proj + down_proj without biases, and GPT-OSS's interleaved experts with biases); its "
                    "weights would be left untouched, so the model is refused rather than silently half-compressed")


def matches_any(name: str, patterns: list[str]) -> bool:
    """How `include` and `exclude` patterns name a module: shell patterns against the full name or its last
    part (`lm_head`, `*.mlp.*`, `down_proj`)."""
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(name.rsplit(".", 1)[-1], p) for p in patterns)


def find_blocks(module, linears: dict) -> tuple[Optional[str], Any]:
    """The repeated transformer blocks: the nn.ModuleList (not an expert group) holding the most linears."""
    import torch

    best, best_count = (None, None), 0
    for name, child in module.named_modules():
        if not isinstance(child, torch.nn.ModuleList) or is_linear_experts(child) or not name:
            continue
        count = sum(1 for key in linears if key.startswith(name + "."))
        if count > best_count:
            best, best_count = (name, child), count
    return best


def blocks_of(module) -> tuple[Optional[str], Any]:
    """The repeated transformer blocks of a model as it is (fused experts and Conv1D layers not opened):
    (name, nn.ModuleList), or (None, None)."""
    return find_blocks(module, {name: child for name, child in module.named_modules() if is_linear_like(child)})


def experts_in(module) -> list[str]:
    """The names, inside `module`, of its expert groups (fused or linearized)."""
    return [name for name, child in module.named_modules() if is_fused_experts(child) or is_linear_experts(child)]


def describe(module) -> Anatomy:
    """The anatomy of a model whose experts are already linearized (or that has none)."""
    import torch

    _refuse_unknown_layouts(module)
    linears = {name: child for name, child in module.named_modules() if is_linear_like(child)}
    blocks_name, blocks = find_blocks(module, linears)
    groups, routers = [], []
    for name, child in module.named_modules():
        if is_linear_experts(child):
            groups.append(ExpertGroup(name, len(child)))
            parent_name = name.rpartition(".")[0]
            parent = module.get_submodule(parent_name) if parent_name else module
            prefix = f"{parent_name}." if parent_name else ""
            routers += [prefix + key for key, _ in parent.named_children() if key not in EXPERT_CHILDREN]
    head_module = module.get_output_embeddings() if hasattr(module, "get_output_embeddings") else None
    head = next((name for name, child in module.named_modules() if head_module is not None and child is head_module),
                None)
    embedding_weights = {id(child.weight) for child in module.modules() if isinstance(child, torch.nn.Embedding)}
    tied = head is not None and hasattr(head_module, "weight") and id(head_module.weight) in embedding_weights
    embeddings = [name for name, child in module.named_modules() if isinstance(child, torch.nn.Embedding)]
    seen, total = set(), 0
    for parameter in module.parameters():
        if id(parameter) not in seen:
            seen.add(id(parameter))
            total += parameter.numel()
    return Anatomy(architecture_of(module), blocks_name, blocks, linears, groups, routers, head, tied, embeddings,
                   total_parameters=total)


def open_for_compression(module) -> Anatomy:
    """Bring the model, in place, into the form stages work on (GPT-2's Conv1D layers as the nn.Linear
    they equal, fused experts as LinearExperts) and describe it."""
    conv1d = conv1d_to_linear(module)
    linearize_experts(module)
    anatomy = describe(module)
    anatomy.conv1d = conv1d
    return anatomy


def restore_layout(module, anatomy: Anatomy, conv1d: Optional[list[str]] = None) -> None:
    """Undo open_for_compression for a float model about to be saved with save_pretrained: experts
    stacked back into their fused tensors, Conv1D layers back (`anatomy.conv1d`, or the `conv1d` names of a
    model opened elsewhere)."""
    for group in anatomy.expert_groups:
        linear = module.get_submodule(group.name)
        if is_linear_experts(linear):
            _replace(module, group.name, linear.to_fused())
    linear_to_conv1d(module, anatomy.conv1d if conv1d is None else conv1d)


# Of the block weights a recipe targets, a stage that changed less than this share has mostly not run: the
# run's gate gets a failing coverage row (gate.check_coverage) instead of a pass that hides it.
MIN_COVERAGE = 0.5


def record_coverage(anatomy: Anatomy, changed, stage: str, ctx, excluded=()) -> None:
    """Put `anatomy.coverage` into the stage's record (`ctx.details`), with a note (`ctx.notes`) when the
    experts or most block weights were left unchanged."""
    record = anatomy.coverage(changed, excluded)
    ctx.details.update(record)
    if record.get("experts_changed_share", 1.0) < MIN_COVERAGE:
        ctx.notes.append(f"{stage}: experts not compressed: {record['experts_changed_share']:.0%} of the expert "
                         f"weights changed, and experts hold {record['expert_parameter_share']:.0%} of the "
                         "model's parameters")
    targeted = 1.0 - record["block_weights_excluded_share"]
    if targeted > 0 and record["block_weights_changed_share"] < MIN_COVERAGE * targeted:
        ctx.notes.append(f"{stage}: changed {record['block_weights_changed_share']:.0%} of the transformer blocks' "
                         f"linear weights, though the recipe targets {targeted:.0%} of them")


def excluded_by(anatomy: Anatomy, chosen: dict) -> list[str]:
    """The linears a stage left alone on purpose: everything it did not choose (patterns, the head)."""
    return [name for name in anatomy.linears if name not in chosen]


def _dense_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """A fused expert module's output with every expert computed for every token and the router's top-k
    weights as a dense (tokens, experts) matrix: the same sum, with no data-dependent shapes, so the ONNX
    exporters can trace it (the eager loop's nonzero / histc cannot be)."""
    import torch

    routing = torch.zeros(hidden_states.shape[0], self.gate_up_proj.shape[0], dtype=hidden_states.dtype,
                          device=hidden_states.device).scatter(1, top_k_index, top_k_weights.to(hidden_states.dtype))
    gate_up = torch.einsum("th,eoh->eto", hidden_states, self.gate_up_proj)
    gate, up = gate_up.chunk(2, dim=-1)
    expert_outputs = torch.einsum("eti,ehi->eth", self.act_fn(gate) * up, self.down_proj)
    return torch.einsum("te,eth->th", routing, expert_outputs)


@contextmanager
def dense_routed_experts(module):
    """While active, every fused expert module of `module` computes all experts densely
    (_dense_experts_forward): for export. Yields how many were switched."""
    import types

    # GPT-OSS's interleaved layout keeps its eager loop: the ONNX exporters refuse it with their own reason
    switched = [child for child in module.modules() if fused_experts_layout(child) == "concatenated"]
    for child in switched:
        child.forward = types.MethodType(_dense_experts_forward, child)
    try:
        yield len(switched)
    finally:
        for child in switched:
            del child.forward


class CalibratingExperts:
    """While active, every LinearExperts of the model sends all tokens through all experts (when
    `all_experts`) and counts the tokens its router chose per expert."""

    def __init__(self, module, all_experts: bool):
        self.groups = {name: child for name, child in module.named_modules() if is_linear_experts(child)}
        self.all_experts = all_experts

    def __enter__(self):
        for group in self.groups.values():
            group.calibrate_all = self.all_experts
        return self

    def counting(self, on: bool) -> None:
        for group in self.groups.values():
            group.counting = on

    def __exit__(self, *exc):
        for group in self.groups.values():
            group.calibrate_all = group.counting = False

    def record(self, min_tokens: int) -> dict:
        """Per group, the tokens the router chose for each expert, and the experts below `min_tokens`."""
        if not self.groups:
            return {}
        counts = {name: list(group.routed_tokens) for name, group in self.groups.items()}
        starved = [f"{name}.{index}" for name, values in counts.items()
                   for index, value in enumerate(values) if value < min_tokens]
        return {"calibrate_all_experts": self.all_experts, "routed_tokens_per_expert": counts,
                "experts_below_min_tokens": starved, "expert_min_tokens": min_tokens}
