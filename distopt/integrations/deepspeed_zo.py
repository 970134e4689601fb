"""DeepSpeed for zeroth-order recipes (used by :func:`distopt.integrations.deepspeed.initialize`).

Zeroth-order recipes (``closure_kind = "forward"``: zo_sgd, hizoo, ...) have no gradient, so there
is nothing for ZeRO-1/2 to partition and nothing for the engine's ``backward``/``step`` to do.
``initialize`` with a zeroth-order optimizer builds the engine *without* an optimizer (stage 0:
data-parallel; stage 3: the parameters partitioned in place, ``stage3_param_persistence_threshold:
0``), points the recipe's ``process_group`` at the engine's data-parallel group (when it was None
or True), and returns the recipe itself as the optimizer. Train with
``optimizer.step(lambda: loss_fn(engine(x), y))``, each rank on its own batch: ranks share the seed
and all-reduce only the n scalars (:mod:`distopt.zo.distributed`); never call ``engine.backward`` /
``engine.step``. ZeRO stage 1/2 and a config ``"optimizer"``/``"scheduler"`` section are refused
(DeepSpeed would keep an fp32 master copy of the weights that a zeroth-order step never reaches); so
is ``wrap`` of a zeroth-order recipe (Accelerate's DeepSpeed plugin: use its DDP config, where
``AcceleratedOptimizer.step(closure)`` forwards the closure). tests/distributed/test_zo_data_parallel.py.
"""
from __future__ import annotations

from typing import Any, Mapping

from distopt.core.shell import DistOptimizer


def _config_dict(kwargs: Mapping[str, Any]) -> dict[str, Any] | None:
    """The DeepSpeed config given as ``config=`` / ``config_params=`` (a dict or a JSON file), or None
    (e.g. ``args.deepspeed_config``, left to DeepSpeed)."""
    cfg = kwargs.get("config", kwargs.get("config_params"))
    if isinstance(cfg, (str, bytes)) or hasattr(cfg, "__fspath__"):
        import json

        with open(cfg) as f:  # type: ignore[arg-type]
            return json.load(f)
    return dict(cfg) if isinstance(cfg, Mapping) else None


def check_zo_config(config: Mapping[str, Any], name: str = "zeroth-order recipe") -> int:
    """The ZeRO stage of ``config`` if a zeroth-order recipe can train under it, else ValueError.

    Stage 0 (data-parallel) and stage 3 with ``stage3_param_persistence_threshold: 0`` (every
    parameter partitioned, so the recipe perturbs exactly what the forward gathers) are supported;
    stages 1/2 partition gradients and optimizer state a zeroth-order step does not have, and need a
    DeepSpeed optimizer whose fp32 master weights the step would never reach."""
    zero = dict(config.get("zero_optimization") or {})
    stage = int(zero.get("stage", 0))
    for key in ("optimizer", "scheduler"):
        if key in config:
            raise ValueError(f"distopt.integrations.deepspeed: the config has an {key!r} section, but the optimizer is "
                             f"the {name}; remove it (schedule the recipe's lr with torch.optim.lr_scheduler)")
    if stage in (1, 2):
        raise ValueError(f"distopt.integrations.deepspeed: ZeRO stage {stage} is not supported for the {name}: it "
                         "partitions gradients and optimizer state (a zeroth-order step has neither) and needs a "
                         "DeepSpeed optimizer whose fp32 master weights the step never reaches; use stage 0 "
                         "(data-parallel: ranks share the seed and all-reduce the n scalars) or stage 3 (parameters "
                         "partitioned, stage3_param_persistence_threshold: 0)")
    if stage == 3 and zero.get("stage3_param_persistence_threshold") != 0:
        raise ValueError(f"distopt.integrations.deepspeed: ZeRO-3 with the {name} needs "
                         "zero_optimization.stage3_param_persistence_threshold: 0 (a persistent parameter keeps a "
                         "full copy that the forward reads but the recipe, perturbing p.ds_tensor, would not)")
    if stage not in (0, 3):
        raise ValueError(f"distopt.integrations.deepspeed: unknown ZeRO stage {stage!r}")
    return stage


def data_parallel_group(engine: Any) -> Any:
    """The process group over which a DeepSpeed engine averages gradients (its data-parallel ranks):
    the group a zeroth-order recipe averages its scalars over."""
    group = getattr(engine, "seq_data_parallel_group", None) or getattr(engine, "data_parallel_group", None)
    if group is None:
        raise RuntimeError(f"distopt.integrations.deepspeed: {type(engine).__name__} has no data_parallel_group")
    return group


def initialize_zo(deepspeed: Any, args: tuple, model: Any, optimizer: DistOptimizer,
                   kwargs: dict[str, Any]) -> Any:
    """``deepspeed.initialize`` for a zeroth-order recipe (module docstring): the engine gets no
    optimizer; the recipe averages over the engine's data-parallel group and is returned as is."""
    cfg = _config_dict(kwargs)
    if cfg is not None:
        check_zo_config(cfg, f"zeroth-order recipe {optimizer.name!r}")
    if kwargs.get("lr_scheduler") is not None:
        raise ValueError("distopt.integrations.deepspeed: lr_scheduler= needs a DeepSpeed optimizer; with a "
                         "zeroth-order recipe build the scheduler on the recipe itself")
    engine, _, loader, scheduler = deepspeed.initialize(*args, model=model, optimizer=None, **kwargs)
    if optimizer.process_group is None or optimizer.process_group is True:  # type: ignore[attr-defined]
        optimizer.process_group = data_parallel_group(engine)  # type: ignore[attr-defined]
    return engine, optimizer, loader, scheduler


__all__ = ["check_zo_config", "data_parallel_group", "initialize_zo"]
