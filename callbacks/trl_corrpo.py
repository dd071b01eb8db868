"""CorR-PO for TRL's ``GRPOTrainer``: switch it on with one argument.

>>> from inversion_monitor.callbacks.trl_corrpo import CorrPOConfig
>>> CorrPOConfig(coef=0.1, gate_threshold=1.0).coef
0.1

Usage (TRL >= 1.16, < 2)::

    trainer = CorrPOGRPOTrainer(model=..., reward_funcs=[accuracy], args=GRPOConfig(...),
                                train_dataset=..., corrpo=CorrPOConfig(coef=0.05))

How it hooks in, and why not a plain reward function: a reward function sees
the prompts as text (not the prompt ids the policy was conditioned on) and
never sees the other reward functions' values, so it can neither measure rho
on exactly the policy's tokens nor gate on the task reward. The subclass
instead

- keeps the prompt and completion ids ``_generate`` returns (the very lists
  the trainer pads into the loss batch), and lays them out exactly as the
  trainer does (left-padded prompts, right-padded completions);
- appends one reward column, ``corrpo``, with weight 1: after the user's
  reward functions ran (``_calculate_rewards``), it holds ``-coef * rho_i``
  (0 for unshaped completions). TRL's ``sum_then_normalize`` aggregation then
  sums ``r_i - coef * rho_i`` and normalises per group: the shaping comes
  before the group normalisation, as CorR-PO requires;
- gates on the task reward, the weighted sum of the user's reward columns;
- logs ``corrpo/rho_mean``, ``corrpo/rho_std``, ``corrpo/shaping_mean`` and
  ``corrpo/unshaped_fraction`` into the trainer's metrics (and TRL logs the
  column itself as ``rewards/corrpo/mean``).

The probe is one extra forward and backward of the policy per generation
batch (last block, Q and O by default); it leaves the model, its gradients
and the RNG state as found.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from importlib.metadata import version as _dist_version
from typing import Any, Literal

import torch
from packaging.version import Version
from pydantic import BaseModel, ConfigDict, Field
from trl import GRPOTrainer

from inversion_monitor.rl.corrpo import corrpo_rewards, sequence_inversion

SUPPORTED_TRL = (Version("1.16"), Version("2"))
"""TRL versions this integration supports: ``>= 1.16, < 2`` (tested with 1.16.0)."""


class UnsupportedTRLVersion(RuntimeError):
    """The installed TRL is outside :data:`SUPPORTED_TRL`; the message says which to install."""


def check_trl_version(installed: str | None = None) -> str:
    """The installed TRL version, or :class:`UnsupportedTRLVersion` naming it and the fix.

    Called when a :class:`CorrPOGRPOTrainer` is made (importing this module
    never fails for the version alone).

    >>> check_trl_version("1.16.0")
    '1.16.0'
    >>> check_trl_version("0.19.1")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    inversion_monitor.callbacks.trl_corrpo.UnsupportedTRLVersion: CorrPOGRPOTrainer supports ...
    """
    found = installed if installed is not None else _dist_version("trl")
    low, high = SUPPORTED_TRL
    if not low <= Version(found) < high:
        raise UnsupportedTRLVersion(
            f"CorrPOGRPOTrainer supports trl >= {low}, < {high} (it relies on "
            f"GRPOTrainer._generate and _calculate_rewards); trl {found} is installed: "
            f"pip install 'trl>={low},<{high}'"
        )
    return found


class CorrPOConfig(BaseModel):
    """CorR-PO settings.

    Attributes:
        coef: lambda, the weight of rho (0.05-0.1 for rewards in [0, 1]).
        gate_threshold: shape only completions whose task reward is >= this.
        method: ``"spearman"`` or ``"pearson"``.
        layers: decoder blocks probed; default the last one.
        projections: default ``("q", "o")`` (one forward and backward per batch).
        min_tokens: fewest completion tokens for a rho; shorter ones are unshaped.

    >>> CorrPOConfig(coef=-1)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    pydantic_core._pydantic_core.ValidationError: 1 validation error for CorrPOConfig
    coef
      Input should be greater than or equal to 0 ...
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    coef: float = Field(default=0.05, ge=0, allow_inf_nan=False)
    gate_threshold: float | None = None
    method: Literal["spearman", "pearson"] = "spearman"
    layers: list[int] | None = None
    projections: tuple[str, ...] | None = None
    min_tokens: int = Field(default=8, ge=4)


@dataclass(frozen=True)
class CorrPOBatch:
    """What CorR-PO measured on this process's share of one generation batch.

    Attributes:
        input_ids, attention_mask, completion_mask: ``[B, P + C]`` as probed.
        task_rewards: ``[B]`` weighted sum of the user's reward functions.
        rho: ``[B]`` per-completion rho (NaN where unusable).
        valid: ``[B]`` bool, rho usable.
        shaping: ``[B]`` the ``corrpo`` reward column (``-coef * rho`` or 0).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    completion_mask: torch.Tensor
    task_rewards: torch.Tensor
    rho: torch.Tensor
    valid: torch.Tensor
    shaping: torch.Tensor


def _no_reward(prompts: list[Any], **kwargs: Any) -> list[None]:
    """Placeholder for the ``corrpo`` column while the user's reward functions run."""
    return [None] * len(prompts)


class CorrPOGRPOTrainer(GRPOTrainer):  # type: ignore[misc]
    """``GRPOTrainer`` whose rewards are shaped by CorR-PO before group normalisation.

    Args:
        *args, **kwargs: as for ``trl.GRPOTrainer``.
        corrpo: a :class:`CorrPOConfig`, or just lambda as a float.

    Attributes:
        last_corrpo: the latest :class:`CorrPOBatch` (this process's rows).

    Raises:
        UnsupportedTRLVersion: the installed TRL is outside :data:`SUPPORTED_TRL`.
    """

    reward_weights: torch.Tensor

    def __init__(self, *args: Any, corrpo: CorrPOConfig | float = 0.05, **kwargs: Any) -> None:
        check_trl_version()
        if isinstance(corrpo, CorrPOConfig):
            self.corrpo = corrpo
        elif isinstance(corrpo, (int, float)) and not isinstance(corrpo, bool):
            self.corrpo = CorrPOConfig(coef=float(corrpo))
        else:
            raise TypeError(
                f"corrpo: expected a CorrPOConfig or a float (lambda), got {type(corrpo).__name__}"
            )
        super().__init__(*args, **kwargs)
        aggregation = getattr(self, "multi_objective_aggregation", "sum_then_normalize")
        if aggregation != "sum_then_normalize":
            raise ValueError(
                f"CorrPOGRPOTrainer: multi_objective_aggregation={aggregation!r} would normalise "
                "the CorR-PO term on its own; use 'sum_then_normalize' (the default) so the "
                "shaped reward r - coef * rho is normalised per group"
            )
        self._corrpo_column = len(self.reward_funcs)
        self.reward_funcs.append(_no_reward)
        self.reward_func_names.append("corrpo")
        self.reward_processing_classes.append(None)
        self.reward_weights = torch.cat([self.reward_weights, torch.ones(1)])
        self._corrpo_rollout: tuple[list[list[int]], list[list[int]]] | None = None
        self.last_corrpo: CorrPOBatch | None = None

    def _generate(self, prompts: list[Any]) -> Any:
        out = super()._generate(prompts)
        self._corrpo_rollout = (out[0], out[1])  # prompt_ids_list, completion_ids_list
        return out

    def _corrpo_batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The policy's tokens laid out as the trainer's loss batch: ids, attention, completion."""
        from trl.trainer.utils import pad

        assert self._corrpo_rollout is not None
        prompt_ids_list, completion_ids_list = self._corrpo_rollout
        device = self.accelerator.device
        pad_id = self._tokenizer.pad_token_id
        multiple = self.pad_to_multiple_of
        prompts = [torch.tensor(ids, dtype=torch.long) for ids in prompt_ids_list]
        completions = [torch.tensor(ids, dtype=torch.long) for ids in completion_ids_list]

        def padded(rows: list[torch.Tensor], value: int, side: str) -> torch.Tensor:
            out: torch.Tensor = pad(
                rows, padding_value=value, padding_side=side, pad_to_multiple_of=multiple
            )
            return out.to(device)

        prompt_ids = padded(prompts, pad_id, "left")
        prompt_mask = padded([torch.ones_like(p) for p in prompts], 0, "left")
        completion_ids = padded(completions, pad_id, "right")
        completion_mask = padded([torch.ones_like(c) for c in completions], 0, "right")
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        completion_only = torch.cat([torch.zeros_like(prompt_mask), completion_mask], dim=1)
        return input_ids, attention_mask, completion_only

    def _calculate_rewards(
        self,
        inputs: Any,
        prompts: list[Any],
        completions: list[Any],
        completion_ids_list: list[Any],
    ) -> torch.Tensor:
        from accelerate.utils import gather

        rewards_per_func: torch.Tensor = super()._calculate_rewards(
            inputs, prompts, completions, completion_ids_list
        )
        if self._corrpo_rollout is None or self._corrpo_rollout[1] is not completion_ids_list:
            raise RuntimeError(
                "CorrPOGRPOTrainer: the completions being scored are not the ones _generate "
                "returned; this TRL version changed GRPOTrainer's internals (supported: "
                f"trl >= {SUPPORTED_TRL[0]}, < {SUPPORTED_TRL[1]})"
            )
        column = self._corrpo_column
        start = self.accelerator.process_index * len(prompts)
        local = rewards_per_func[start : start + len(prompts), :column]
        weights = self.reward_weights[:column].to(local.device)
        task = (local * weights).nansum(dim=1)
        unscorable = torch.isnan(local).all(dim=1)

        input_ids, attention_mask, completion_mask = self._corrpo_batch()
        config = self.corrpo
        inversion = sequence_inversion(
            self.model,
            input_ids,
            attention_mask=attention_mask,
            completion_mask=completion_mask,
            method=config.method,
            layers=config.layers,
            projections=config.projections,
            min_tokens=config.min_tokens,
        )
        rho = inversion.rho.to(task.device)
        valid = inversion.valid.to(task.device) & ~unscorable
        shaped = corrpo_rewards(
            task, rho, coef=config.coef, gate_threshold=config.gate_threshold, valid=valid
        )
        shaping = (shaped - task).to(rewards_per_func.dtype)
        applied = (
            valid if config.gate_threshold is None else valid & (task >= config.gate_threshold)
        )
        shaping = torch.where(applied, shaping, torch.zeros_like(shaping))
        shaping[unscorable] = math.nan  # keep TRL's "every function returned None" handling
        self.last_corrpo = CorrPOBatch(
            input_ids=input_ids,
            attention_mask=attention_mask,
            completion_mask=completion_mask,
            task_rewards=task,
            rho=rho,
            valid=valid,
            shaping=shaping,
        )
        rewards_per_func[:, column] = gather(shaping)
        self._corrpo_log(
            gather(torch.where(valid, rho, torch.full_like(rho, math.nan)).float()),
            gather(shaping),
            gather(applied.float()),
        )
        return rewards_per_func

    def _corrpo_log(self, rho: torch.Tensor, shaping: torch.Tensor, applied: torch.Tensor) -> None:
        mode = "train" if self.model.training else "eval"
        usable = rho[torch.isfinite(rho)]
        metrics = self._metrics[mode]
        metrics["corrpo/rho_mean"].append(float(usable.mean()) if usable.numel() else math.nan)
        metrics["corrpo/rho_std"].append(
            float(usable.std()) if usable.numel() > 1 else (0.0 if usable.numel() else math.nan)
        )
        metrics["corrpo/shaping_mean"].append(float(torch.nanmean(shaping)))
        metrics["corrpo/unshaped_fraction"].append(float(1.0 - applied.mean()))
