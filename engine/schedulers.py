"""DDPM and DDIM noise schedulers whose step stays on the device (CUDA-graph friendly).

Settings are read from a diffusers scheduler config (`scheduler/scheduler_config.json`), so a diffusers
model folder drives both training (`add_noise`, `get_velocity`) and sampling (`set_timesteps`, `step`).
Unlike diffusers' schedulers, `step` never touches the host: `set_timesteps` precomputes one row of
fp32 coefficients per inference step on the device, and `step` picks its row with a 0-dim int64 device
tensor (`index_select`, no `.item()`, no Python branch on a tensor value). Stochastic steps take their
noise as an argument so a captured graph can refill a preallocated buffer.

Formulas follow the papers and diffusers 0.42's `DDIMScheduler`/`DDPMScheduler` (the reference the tests
compare against); the code is this project's own.

Notation (variable name -> paper symbol; DDPM = Ho et al. 2020, DDIM = Song et al. 2021, whose "alpha_t"
is DDPM's alpha_bar_t):
    T                    num_train_timesteps, training timesteps t = 0 .. T-1
    n                    num_inference_steps; step index i = 0 .. n-1 walks `timesteps` (t_i decreasing)
    beta_t               betas[t], forward-process variance of one training step
    alpha_t              1 - beta_t                                  (`current_alpha_t` for a skipped step)
    alpha_prod_t         alpha_bar_t = prod_{s<=t} alpha_s           (DDIM: alpha_t)
    alpha_prod_t_prev    alpha_bar_{t_prev}; DDIM: t_prev = t - T // n, DDPM: t_prev = next entry of
                         `timesteps`; t_prev < 0 uses `final_alpha_cumprod` (DDIM) or 1 (DDPM)
    beta_prod_t          1 - alpha_bar_t
    current_alpha_t      alpha_bar_t / alpha_bar_{t_prev}   (the alpha of the merged step t_prev -> t)
    current_beta_t       1 - current_alpha_t                (its beta)
    sample               x_t
    pred_epsilon         epsilon_theta(x_t, t)
    pred_original_sample x_0 prediction, f_theta(x_t) = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t)
                         (DDPM eq. 15, DDIM eq. 9)
    v                    sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x_0 (Salimans & Ho 2022, sec. 4)
    variance             DDIM: sigma_t^2 / eta^2 = (1 - abar_prev)/(1 - abar_t) * (1 - abar_t/abar_prev)
                         (DDIM eq. 16);  DDPM: beta_tilde_t = (1 - abar_prev)/(1 - abar_t) * beta_t (eq. 7)
    std_dev_t            sigma_t (DDIM: eta * sqrt(variance); DDPM: per `variance_type`)
    noise                z ~ N(0, I), supplied by the caller
    prev_sample          x_{t_prev}
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

__all__ = [
    "SchedulerConfig",
    "DDIMScheduler",
    "DDPMScheduler",
    "load_scheduler",
    "default_scheduler",
    "SD_SCHEDULE",
    "read_scheduler_config",
    "SCHEDULER_CONFIG_NAME",
]

SCHEDULER_CONFIG_NAME = "scheduler_config.json"

_BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
_PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
_SPACINGS = ("leading", "trailing", "linspace")
_VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log")


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """The diffusers scheduler fields this engine understands; defaults equal diffusers' DDIM/DDPM defaults.

    `set_alpha_to_one` is read by DDIM only and `variance_type` by DDPM only, so one config serves both
    (the CLI's --sampler switches between them with identical betas).
    """

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: tuple[float, ...] | None = None
    prediction_type: str = "epsilon"
    clip_sample: bool = True
    clip_sample_range: float = 1.0
    set_alpha_to_one: bool = True
    steps_offset: int = 0
    timestep_spacing: str = "leading"
    rescale_betas_zero_snr: bool = False
    variance_type: str = "fixed_small"
    thresholding: bool = False

    def __post_init__(self) -> None:
        for name in ("clip_sample", "set_alpha_to_one", "rescale_betas_zero_snr", "thresholding"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"scheduler config: {name} must be a bool, got {getattr(self, name)!r}")
        for name in ("num_train_timesteps", "steps_offset"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"scheduler config: {name} must be an int, got {value!r}")
        for name in ("beta_start", "beta_end", "clip_sample_range"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"scheduler config: {name} must be a number, got {value!r}")
        if self.num_train_timesteps < 1:
            raise ValueError(
                f"scheduler config: num_train_timesteps must be >= 1, got {self.num_train_timesteps}"
            )
        if self.steps_offset < 0:
            raise ValueError(f"scheduler config: steps_offset must be >= 0, got {self.steps_offset}")
        if self.clip_sample_range <= 0:
            raise ValueError(f"scheduler config: clip_sample_range must be > 0, got {self.clip_sample_range}")
        if self.beta_schedule not in _BETA_SCHEDULES:
            raise ValueError(
                f"scheduler config: beta_schedule {self.beta_schedule!r} is not supported; use one of {_BETA_SCHEDULES}"
            )
        if self.prediction_type not in _PREDICTION_TYPES:
            raise ValueError(
                f"scheduler config: prediction_type {self.prediction_type!r} is not supported; "
                f"use one of {_PREDICTION_TYPES}"
            )
        if self.timestep_spacing not in _SPACINGS:
            raise ValueError(
                f"scheduler config: timestep_spacing {self.timestep_spacing!r} is not supported; use one of {_SPACINGS}"
            )
        if self.thresholding:
            raise ValueError("scheduler config: thresholding=True (dynamic thresholding) is not supported")
        if self.variance_type.startswith("learned"):
            raise ValueError(
                f"scheduler config: variance_type {self.variance_type!r} (a model-predicted variance) is not "
                f"supported; use one of {_VARIANCE_TYPES}"
            )
        if self.variance_type not in _VARIANCE_TYPES:
            raise ValueError(
                f"scheduler config: variance_type {self.variance_type!r} is unknown; use one of {_VARIANCE_TYPES}"
            )
        if self.trained_betas is not None:
            betas = tuple(float(b) for b in self.trained_betas)
            if len(betas) != self.num_train_timesteps:
                raise ValueError(
                    f"scheduler config: trained_betas has {len(betas)} values but num_train_timesteps is "
                    f"{self.num_train_timesteps}"
                )
            if not all(0.0 < b < 1.0 for b in betas):
                raise ValueError("scheduler config: trained_betas must all lie in (0, 1)")
            object.__setattr__(self, "trained_betas", betas)

    @classmethod
    def from_dict(cls, config: Mapping[str, Any], *, strict: bool = False) -> SchedulerConfig:
        """Build from a diffusers config dict; unknown keys (`_class_name`, other classes' fields) are ignored
        unless `strict` (used for keyword arguments, where an unknown name is a typo)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in config if k not in known)
        if strict and unknown:
            raise TypeError(f"unknown scheduler setting(s): {', '.join(unknown)}")
        kwargs = {k: v for k, v in config.items() if k in known}
        if kwargs.get("trained_betas") is not None:
            kwargs["trained_betas"] = tuple(kwargs["trained_betas"])
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of the fields (trained_betas as a list), JSON-serialisable."""
        out = dataclasses.asdict(self)
        if out["trained_betas"] is not None:
            out["trained_betas"] = list(out["trained_betas"])
        return out


def read_scheduler_config(path_or_config: str | os.PathLike | Mapping[str, Any]) -> dict[str, Any]:
    """A diffusers scheduler config as a dict, from a dict, a `scheduler_config.json` file, a folder holding
    one, or a diffusers model folder holding `scheduler/scheduler_config.json`."""
    if isinstance(path_or_config, Mapping):
        return dict(path_or_config)
    path = os.fspath(path_or_config)
    candidates = (
        [path]
        if os.path.isfile(path)
        else [
            os.path.join(path, SCHEDULER_CONFIG_NAME),
            os.path.join(path, "scheduler", SCHEDULER_CONFIG_NAME),
        ]
    )
    for candidate in candidates:
        if os.path.isfile(candidate):
            with open(candidate, encoding="utf-8") as f:
                config = json.load(f)
            if not isinstance(config, dict):
                raise ValueError(f"{candidate}: a scheduler config must be a JSON object")
            return config
    raise FileNotFoundError(
        f"no scheduler config at {path!r} (looked for a JSON file, {SCHEDULER_CONFIG_NAME} in it, "
        f"or scheduler/{SCHEDULER_CONFIG_NAME})"
    )


# ----------------------------------------------------------------------------------------------- schedules


def make_betas(config: SchedulerConfig) -> torch.Tensor:
    """beta_t for t = 0..T-1 as fp32 (CPU), computed as diffusers does so alphas_cumprod match bit-for-bit."""
    T = config.num_train_timesteps
    if config.trained_betas is not None:
        betas = torch.tensor(config.trained_betas, dtype=torch.float32)
    elif config.beta_schedule == "linear":
        betas = torch.linspace(config.beta_start, config.beta_end, T, dtype=torch.float32)
    elif config.beta_schedule == "scaled_linear":
        # Stable Diffusion's schedule: linear in sqrt(beta).
        betas = torch.linspace(config.beta_start**0.5, config.beta_end**0.5, T, dtype=torch.float32) ** 2
    else:  # squaredcos_cap_v2: Nichol & Dhariwal 2021 cosine alpha_bar, betas capped at 0.999
        edges = np.arange(T + 1, dtype=np.float64) / T
        alpha_bar = np.cos((edges + 0.008) / 1.008 * math.pi / 2) ** 2
        betas = torch.from_numpy(np.minimum(1.0 - alpha_bar[1:] / alpha_bar[:-1], 0.999)).float()
    if config.rescale_betas_zero_snr:
        betas = rescale_betas_zero_snr(betas)
    return betas


def rescale_betas_zero_snr(betas: torch.Tensor) -> torch.Tensor:
    """Shift and scale sqrt(alpha_bar) so the last step has zero SNR and the first is unchanged
    (Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed", Algorithm 1)."""
    sqrt_abar = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = sqrt_abar[0].clone(), sqrt_abar[-1].clone()
    sqrt_abar = (sqrt_abar - last) * (first / (first - last))
    abar = sqrt_abar**2
    alphas = torch.cat([abar[:1], abar[1:] / abar[:-1]])
    return 1.0 - alphas


def make_timesteps(config: SchedulerConfig, num_inference_steps: int) -> np.ndarray:
    """The n training timesteps visited at inference, decreasing (diffusers' three spacings, Lin et al.
    2023 Table 2)."""
    T, n = config.num_train_timesteps, num_inference_steps
    if config.timestep_spacing == "linspace":
        # np.round rounds half to even, as diffusers does.
        timesteps = np.linspace(0, T - 1, n).round()[::-1]
    elif config.timestep_spacing == "leading":
        timesteps = (np.arange(n) * (T // n))[::-1] + config.steps_offset
    else:  # trailing: start exactly at T-1 and step back by T/n
        # np.arange with a float step, as diffusers does, so values rounding at .5 match it exactly (e.g.
        # n = 48). For some n (61, 103, ...) that arange overshoots to n + 1 values ending at t = -1; we
        # keep the n intended ones.
        timesteps = (np.round(np.arange(T, 0, -T / n)) - 1)[:n]
    timesteps = np.ascontiguousarray(timesteps).astype(np.int64)
    if timesteps.max() >= T or timesteps.min() < 0:
        raise ValueError(
            f"{config.timestep_spacing!r} spacing with steps_offset={config.steps_offset} gives timesteps outside "
            f"[0, {T}) for {n} steps: {timesteps.min()}..{timesteps.max()}"
        )
    return timesteps


def _expand_to(values: torch.Tensor, ndim: int) -> torch.Tensor:
    """(B,) -> (B, 1, ..., 1) with `ndim` dims, to broadcast per-sample scalars over (B, C, F, H, W)."""
    return values.reshape(values.shape[0], *([1] * (ndim - 1)))


# ----------------------------------------------------------------------------------------------- schedulers


class _DeviceScheduler:
    """Shared machinery: config, betas, timesteps, the per-step device table and training helpers.

    Subclasses set `_columns` (names of the table's columns) and implement `_table_rows`, `step`
    and `_linear_coefficients`.
    """

    kind: str = ""
    order = 1
    init_noise_sigma = 1.0
    _columns: tuple[str, ...] = ()

    def __init__(self, **settings: Any) -> None:
        self.config = SchedulerConfig.from_dict(settings, strict=True)
        self.betas = make_betas(self.config)  # (T,) fp32, CPU
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)  # alpha_bar_t, (T,) fp32, CPU
        self._alphas_cumprod_on: dict[torch.device, torch.Tensor] = {}
        self.num_inference_steps: int | None = None
        # Before set_timesteps: every training timestep, like diffusers.
        self.timesteps = torch.arange(self.config.num_train_timesteps - 1, -1, -1, dtype=torch.int64)
        self.prev_timesteps: torch.Tensor | None = None
        self._table: torch.Tensor | None = None  # (n, len(_columns)) fp32 on the sampling device

    @classmethod
    def from_config(cls, config: str | os.PathLike | Mapping[str, Any] | SchedulerConfig, **overrides: Any):
        """Build from a diffusers config (dict, `scheduler_config.json`, or a folder holding it)."""
        if isinstance(config, SchedulerConfig):
            settings = config.to_dict()
        else:
            raw = read_scheduler_config(config)
            settings = SchedulerConfig.from_dict(raw).to_dict()
        settings.update(overrides)
        return cls(**settings)

    def to_diffusers_config(self) -> dict[str, Any]:
        """Config dict that diffusers' class of the same name loads (`_class_name` included)."""
        out = self.config.to_dict()
        out.pop("variance_type" if self.kind == "ddim" else "set_alpha_to_one")
        return {"_class_name": type(self).__name__, **out}

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Write `scheduler_config.json` into `folder` (created if needed), readable by diffusers."""
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, SCHEDULER_CONFIG_NAME), "w", encoding="utf-8") as f:
            json.dump(self.to_diffusers_config(), f, indent=2, sort_keys=True)

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config})"

    # ---- inference setup

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """Choose the n timesteps and precompute every step's coefficients on `device` (the only host work)."""
        T = self.config.num_train_timesteps
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int):
            raise ValueError(f"num_inference_steps must be an int, got {num_inference_steps!r}")
        if not 1 <= num_inference_steps <= T:
            raise ValueError(f"num_inference_steps must be in [1, {T}], got {num_inference_steps}")
        timesteps = make_timesteps(self.config, num_inference_steps)
        prev = self._prev_timesteps(timesteps, num_inference_steps)
        abar = self.alphas_cumprod
        alpha_prod_t = abar[torch.from_numpy(timesteps)]
        alpha_prod_t_prev = torch.where(
            torch.from_numpy(prev) >= 0,
            abar[torch.from_numpy(np.maximum(prev, 0))],
            self._final_alpha_cumprod(),
        )
        # Rows are built on the CPU in fp32 with diffusers' operation order, then moved once.
        columns = self._table_rows(alpha_prod_t, alpha_prod_t_prev, torch.from_numpy(timesteps))
        table = torch.stack([columns[name] for name in self._columns], dim=1).to(torch.float32)
        self.num_inference_steps = num_inference_steps
        self.timesteps = torch.from_numpy(timesteps).to(device)
        self.prev_timesteps = torch.from_numpy(prev).to(device)
        self._table = table.to(device)

    def _prev_timesteps(self, timesteps: np.ndarray, n: int) -> np.ndarray:
        raise NotImplementedError

    def _final_alpha_cumprod(self) -> torch.Tensor:
        raise NotImplementedError

    def _table_rows(
        self, alpha_prod_t: torch.Tensor, alpha_prod_t_prev: torch.Tensor, timesteps: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _column(self, name: str) -> torch.Tensor:
        self._require_table()
        return self._table[:, self._columns.index(name)]

    @property
    def alpha_prod_t(self) -> torch.Tensor:
        """alpha_bar_{t_i} for every inference step i, (n,) fp32 on the sampling device."""
        return self._column("alpha_prod_t")

    @property
    def alpha_prod_t_prev(self) -> torch.Tensor:
        """alpha_bar_{t_prev(i)} for every inference step i, (n,) fp32 on the sampling device."""
        return self._column("alpha_prod_t_prev")

    def _require_table(self) -> None:
        if self._table is None:
            raise ValueError(f"{type(self).__name__}: call set_timesteps(num_inference_steps, device) first")

    def _row(self, step_index: torch.Tensor | int) -> dict[str, torch.Tensor]:
        """This step's coefficients as 0-dim device tensors, picked without a host sync."""
        self._require_table()
        table = self._table
        if isinstance(step_index, int) and not isinstance(step_index, bool):
            if not 0 <= step_index < table.shape[0]:
                raise ValueError(f"step_index {step_index} is outside [0, {table.shape[0]})")
            step_index = torch.tensor(step_index, dtype=torch.int64, device=table.device)
        elif not isinstance(step_index, torch.Tensor):
            raise ValueError(f"step_index must be a 0-dim int64 tensor (or an int), got {type(step_index)}")
        if step_index.ndim != 0 or step_index.dtype != torch.int64:
            raise ValueError(
                f"step_index must be a 0-dim int64 tensor, got shape {tuple(step_index.shape)} {step_index.dtype}"
            )
        if step_index.device != table.device:
            raise ValueError(f"step_index is on {step_index.device} but the schedule is on {table.device}")
        # index_select with a device index: unlike `table[step_index]`, it never converts the index to a
        # Python int (which would sync and break CUDA-graph capture). Out-of-range indices fail on the device.
        row = table.index_select(0, step_index.reshape(1)).reshape(-1)
        return dict(zip(self._columns, row.unbind(0)))

    def _x0_and_eps(
        self,
        model_output: torch.Tensor,
        sample: torch.Tensor,
        sqrt_abar: torch.Tensor,
        sqrt_one_minus_abar: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(pred_original_sample, pred_epsilon) from the model output, per prediction_type (DDIM eq. 9)."""
        kind = self.config.prediction_type
        if kind == "epsilon":
            x0 = (sample - sqrt_one_minus_abar * model_output) / sqrt_abar
            eps = model_output
        elif kind == "sample":
            x0 = model_output
            eps = (sample - sqrt_abar * x0) / sqrt_one_minus_abar
        else:  # v_prediction
            x0 = sqrt_abar * sample - sqrt_one_minus_abar * model_output
            eps = sqrt_abar * model_output + sqrt_one_minus_abar * sample
        return x0, eps

    def _clip(self, x0: torch.Tensor) -> torch.Tensor:
        if self.config.clip_sample:
            return x0.clamp(-self.config.clip_sample_range, self.config.clip_sample_range)
        return x0

    @staticmethod
    def _check_eta(eta: float) -> float:
        if isinstance(eta, torch.Tensor) or not isinstance(eta, (int, float)) or isinstance(eta, bool):
            raise ValueError(f"eta must be a Python float (it selects the graph), got {type(eta)}")
        return float(eta)

    def coefficients(self, step_index: torch.Tensor | int, eta: float = 0.0) -> torch.Tensor:
        """`[c_sample, c_model, c_noise]` (fp32, (3,), on the device) with
        `prev = c_sample * sample + c_model * model_output + c_noise * noise` equal to `step(...)`.

        `c_model` multiplies the raw model output whatever `prediction_type` is (for epsilon prediction it
        is the epsilon coefficient). The update is linear only without x_0 clipping.
        """
        if self.config.clip_sample:
            raise ValueError(
                "coefficients(): the update is not linear with clip_sample=True (x_0 is clamped); "
                "set clip_sample=False or use step()"
            )
        row = self._row(step_index)
        return torch.stack(self._linear_coefficients(row, self._check_eta(eta))).to(torch.float32)

    def _linear_coefficients(
        self, row: dict[str, torch.Tensor], eta: float
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def scale_model_input(self, sample: torch.Tensor, timestep: Any = None) -> torch.Tensor:
        """Identity: DDPM/DDIM feed x_t to the model unscaled (kept for diffusers' sampler interface)."""
        return sample

    # ---- training helpers

    def _abar_for(self, timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        device = like.device
        abar = self._alphas_cumprod_on.get(device)
        if abar is None:  # one copy per device, so the training step does not re-upload the table
            abar = self._alphas_cumprod_on[device] = self.alphas_cumprod.to(device)
        if timesteps.ndim > 1 or (timesteps.ndim == 1 and timesteps.shape[0] not in (1, like.shape[0])):
            raise ValueError(
                f"timesteps must be 0-dim or (B,) with B = {like.shape[0]}, got shape {tuple(timesteps.shape)}"
            )
        if timesteps.is_floating_point():
            raise ValueError(f"timesteps must be an integer tensor, got {timesteps.dtype}")
        return _expand_to(abar[timesteps.to(device).reshape(-1)], like.ndim)

    def add_noise(self, original: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Forward process q(x_t | x_0) (DDPM eq. 4): sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, per sample."""
        abar = self._abar_for(timesteps, original)
        out = abar.sqrt() * original.float() + (1.0 - abar).sqrt() * noise.float()
        return out.to(original.dtype)

    def get_velocity(
        self, sample: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor:
        """v-prediction target: sqrt(abar_t) eps - sqrt(1 - abar_t) x_0 (Salimans & Ho 2022)."""
        abar = self._abar_for(timesteps, sample)
        out = abar.sqrt() * noise.float() - (1.0 - abar).sqrt() * sample.float()
        return out.to(sample.dtype)


class DDIMScheduler(_DeviceScheduler):
    """DDIM (Song et al. 2021, eq. 12): x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - sigma^2) eps + sigma z,
    sigma = eta * sqrt(variance); eta = 0 is deterministic, eta = 1 matches DDPM's posterior variance."""

    kind = "ddim"
    _columns = (
        "alpha_prod_t",
        "alpha_prod_t_prev",
        "sqrt_alpha_prod_t",
        "sqrt_beta_prod_t",
        "sqrt_alpha_prod_t_prev",
        "variance",
    )

    def _prev_timesteps(self, timesteps: np.ndarray, n: int) -> np.ndarray:
        # diffusers' DDIM always steps back by T // n, whatever the spacing; negative -> final_alpha_cumprod.
        return timesteps - self.config.num_train_timesteps // n

    def _final_alpha_cumprod(self) -> torch.Tensor:
        return torch.tensor(1.0) if self.config.set_alpha_to_one else self.alphas_cumprod[0]

    @property
    def final_alpha_cumprod(self) -> torch.Tensor:
        """alpha_bar used after the last step: 1 (set_alpha_to_one) or alpha_bar_0."""
        return self._final_alpha_cumprod()

    def _table_rows(self, alpha_prod_t, alpha_prod_t_prev, timesteps):
        beta_prod_t = 1 - alpha_prod_t
        return {
            "alpha_prod_t": alpha_prod_t,
            "alpha_prod_t_prev": alpha_prod_t_prev,
            "sqrt_alpha_prod_t": alpha_prod_t**0.5,
            "sqrt_beta_prod_t": beta_prod_t**0.5,
            "sqrt_alpha_prod_t_prev": alpha_prod_t_prev**0.5,
            "variance": ((1 - alpha_prod_t_prev) / beta_prod_t) * (1 - alpha_prod_t / alpha_prod_t_prev),
        }

    def _sigma_and_direction(
        self, row: dict[str, torch.Tensor], eta: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0.0 <= eta <= 1.0:
            # Beyond 1 the direction term sqrt(1 - abar_prev - sigma^2) goes imaginary (NaN).
            raise ValueError(f"DDIM eta must be in [0, 1], got {eta}")
        std_dev_t = eta * row["variance"] ** 0.5
        # Clamp only guards fp rounding at eta = 1 (the exact value is >= 0 for eta <= 1).
        direction = (1 - row["alpha_prod_t_prev"] - std_dev_t**2).clamp_min(0.0) ** 0.5
        return std_dev_t, direction

    def step(
        self,
        model_output: torch.Tensor,
        step_index: torch.Tensor | int,
        sample: torch.Tensor,
        noise: torch.Tensor | None = None,
        eta: float = 0.0,
    ) -> torch.Tensor:
        """x_{t_prev} from x_t and the model output at step `step_index` (a 0-dim int64 device tensor).

        eta > 0 needs `noise` (standard normal, sample's shape). Computes in fp32, returns sample.dtype.
        """
        eta = self._check_eta(eta)
        if eta > 0 and noise is None:
            raise ValueError(
                "DDIM step with eta > 0 needs `noise` (a standard normal tensor of sample's shape)"
            )
        row = self._row(step_index)
        x_t = sample.float()
        x0, eps = self._x0_and_eps(
            model_output.float(), x_t, row["sqrt_alpha_prod_t"], row["sqrt_beta_prod_t"]
        )
        x0 = self._clip(x0)
        std_dev_t, direction = self._sigma_and_direction(row, eta)
        prev = row["sqrt_alpha_prod_t_prev"] * x0 + direction * eps  # DDIM eq. 12 without the noise term
        if eta > 0:
            prev = prev + std_dev_t * noise.float()
        return prev.to(sample.dtype)

    def _linear_coefficients(self, row, eta):
        std_dev_t, direction = self._sigma_and_direction(row, eta)
        s, s1, sp = row["sqrt_alpha_prod_t"], row["sqrt_beta_prod_t"], row["sqrt_alpha_prod_t_prev"]
        kind = self.config.prediction_type
        if kind == "epsilon":  # x0 = (x - s1 m) / s, eps = m
            return sp / s, direction - sp * s1 / s, std_dev_t
        if kind == "v_prediction":  # x0 = s x - s1 m, eps = s m + s1 x
            return sp * s + direction * s1, direction * s - sp * s1, std_dev_t
        # sample: x0 = m, eps = (x - s m) / s1
        return direction / s1, sp - direction * s / s1, std_dev_t


class DDPMScheduler(_DeviceScheduler):
    """DDPM ancestral sampling (Ho et al. 2020, eq. 6-7): x_prev = mu_tilde(x_t, x0) + sigma_t z, with the
    merged-step betas of a shortened schedule; no noise at t = 0 (a device-side mask)."""

    kind = "ddpm"
    _columns = (
        "alpha_prod_t",
        "alpha_prod_t_prev",
        "sqrt_alpha_prod_t",
        "sqrt_beta_prod_t",
        "x0_coeff",
        "sample_coeff",
        "std_dev_t",
    )

    def _prev_timesteps(self, timesteps: np.ndarray, n: int) -> np.ndarray:
        # diffusers' DDPM steps to the next listed timestep (= t - T // n for "leading"); -1 after the last.
        return np.append(timesteps[1:], -1)

    def _final_alpha_cumprod(self) -> torch.Tensor:
        return torch.tensor(1.0)

    def _table_rows(self, alpha_prod_t, alpha_prod_t_prev, timesteps):
        beta_prod_t = 1 - alpha_prod_t
        beta_prod_t_prev = 1 - alpha_prod_t_prev
        current_alpha_t = alpha_prod_t / alpha_prod_t_prev
        current_beta_t = 1 - current_alpha_t
        # Posterior variance beta_tilde (eq. 7), floored so its log stays finite.
        variance = ((1 - alpha_prod_t_prev) / (1 - alpha_prod_t) * current_beta_t).clamp(min=1e-20)
        kind = self.config.variance_type
        if kind == "fixed_small":
            std = variance**0.5
        elif kind == "fixed_small_log":
            std = torch.exp(0.5 * torch.log(variance))
        elif kind == "fixed_large":
            std = current_beta_t**0.5
        else:
            # fixed_large_log: sigma^2 = beta_t, held as a log. diffusers 0.42 takes sqrt of that log
            # (NaN); we use the meaning of the name, so this equals "fixed_large".
            std = torch.exp(0.5 * torch.log(current_beta_t))
        # diffusers adds noise when t > 0 (not when t_prev >= 0), which matters with steps_offset.
        std = torch.where(timesteps > 0, std, torch.zeros_like(std))
        return {
            "alpha_prod_t": alpha_prod_t,
            "alpha_prod_t_prev": alpha_prod_t_prev,
            "sqrt_alpha_prod_t": alpha_prod_t**0.5,
            "sqrt_beta_prod_t": beta_prod_t**0.5,
            "x0_coeff": (alpha_prod_t_prev**0.5 * current_beta_t) / beta_prod_t,
            "sample_coeff": current_alpha_t**0.5 * beta_prod_t_prev / beta_prod_t,
            "std_dev_t": std,
        }

    @staticmethod
    def _check_no_eta(eta: float) -> None:
        if eta != 0.0:
            raise ValueError(
                f"eta is a DDIM setting; DDPM's noise level comes from variance_type (got eta={eta})"
            )

    def step(
        self,
        model_output: torch.Tensor,
        step_index: torch.Tensor | int,
        sample: torch.Tensor,
        noise: torch.Tensor | None = None,
        eta: float = 0.0,
    ) -> torch.Tensor:
        """x_{t_prev} from x_t, the model output and `noise` (always required; ignored at t = 0 through a
        zero std in the table). Computes in fp32, returns sample.dtype."""
        self._check_no_eta(eta)
        if noise is None:
            raise ValueError("DDPM step needs `noise` (a standard normal tensor of sample's shape)")
        row = self._row(step_index)
        x_t = sample.float()
        x0, _ = self._x0_and_eps(model_output.float(), x_t, row["sqrt_alpha_prod_t"], row["sqrt_beta_prod_t"])
        x0 = self._clip(x0)
        mean = row["x0_coeff"] * x0 + row["sample_coeff"] * x_t  # posterior mean mu_tilde, DDPM eq. 7
        return (mean + row["std_dev_t"] * noise.float()).to(sample.dtype)

    def _linear_coefficients(self, row, eta):
        self._check_no_eta(eta)
        s, s1 = row["sqrt_alpha_prod_t"], row["sqrt_beta_prod_t"]
        cx0, cs = row["x0_coeff"], row["sample_coeff"]
        kind = self.config.prediction_type
        if kind == "epsilon":
            return cx0 / s + cs, -cx0 * s1 / s, row["std_dev_t"]
        if kind == "v_prediction":
            return cx0 * s + cs, -cx0 * s1, row["std_dev_t"]
        return cs, cx0, row["std_dev_t"]


_CLASSES: dict[str, type[_DeviceScheduler]] = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler}

# The engine's default schedule when a model folder brings none (training from a preset): Stable
# Diffusion's / ModelScope's 1000-step scaled-linear betas. The classes' own defaults stay diffusers'
# (`DDPMScheduler()` equals `diffusers.DDPMScheduler()`), so configs read from folders mean the same thing.
SD_SCHEDULE: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
}


def default_scheduler(kind: str = "ddpm") -> DDIMScheduler | DDPMScheduler:
    """A scheduler of `kind` ("ddim" / "ddpm") on SD's scaled-linear 1000-step schedule."""
    return load_scheduler(SD_SCHEDULE, kind=kind)
_CLASS_NAMES = {cls.__name__: kind for kind, cls in _CLASSES.items()}


def load_scheduler(
    path_or_config: str | os.PathLike | Mapping[str, Any], kind: str | None = None
) -> DDIMScheduler | DDPMScheduler:
    """A DDIM or DDPM scheduler from a diffusers config (dict, JSON file, scheduler folder or model folder).

    `kind` ("ddim" / "ddpm") overrides the config's `_class_name`, keeping its betas; without it the
    config must name DDIMScheduler or DDPMScheduler.
    """
    config = read_scheduler_config(path_or_config)
    if kind is None:
        class_name = config.get("_class_name")
        if class_name not in _CLASS_NAMES:
            raise ValueError(
                f"scheduler class {class_name!r} is not supported (supported: {', '.join(_CLASS_NAMES)}); "
                "pass kind='ddim' or kind='ddpm' to use its betas with one of them"
            )
        kind = _CLASS_NAMES[class_name]
    if kind not in _CLASSES:
        raise ValueError(f"scheduler kind must be one of {tuple(_CLASSES)}, got {kind!r}")
    return _CLASSES[kind].from_config(config)
