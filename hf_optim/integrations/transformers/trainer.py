"""``hf_optim.Trainer``: transformers' ``Trainer`` with safetensors optimizer / scheduler checkpoints.

Checkpoints hold ``optimizer.safetensors`` (+ index when sharded) and ``scheduler.json`` written by
:func:`hf_optim.save_state`, instead of pickled ``optimizer.pt`` / ``scheduler.pt``; everything
else (model weights, ``trainer_state.json``, ``rng_state.pth``, scaler) is transformers' own. Resuming reads
them back, still accepts checkpoints that hold ``optimizer.pt`` (read by transformers with
``weights_only=True``), and ``train(resume_from_checkpoint="hf://USER/REPO[@REVISION]/SUBFOLDER")`` downloads
the checkpoint folder from the Hub first.

The schedule is whatever Trainer builds from ``lr_scheduler_type`` (transformers' own for its names, hf_optim's
for names only hf_optim has). ``scheduler.json`` stores the scheduler's JSON ``state_dict`` (its position:
``last_epoch``, ``base_lrs``, ``_last_lr``, ...) plus ``hf_optim_config`` when the schedule has one; on resume it
is loaded into the scheduler Trainer rebuilt from the same ``TrainingArguments``, exactly as Trainer does with
``scheduler.pt``.

Under FSDP2 every process writes its own shard of the optimizer state (:func:`hf_optim.save_state` with
``model=``, format version 2) and resumes from it on any number of processes; this path is thin over the
torch-level functions tested on CPU and has not been run on GPUs here (``scripts/gpu_check.sh`` checks it).
Under DeepSpeed ZeRO every process writes its own partition (format version 3, through
``hf_optim.integrations.deepspeed``) instead of DeepSpeed's pickled ``global_stepN/``; resuming loads the model's
weights from the checkpoint's safetensors, then the state, on any number of processes and any stage (a GPU check:
``scripts/gpu_check.sh``; ZeRO-3 needs ``stage3_gather_16bit_weights_on_model_save``). A checkpoint holding
DeepSpeed's own files is still resumed by DeepSpeed. FSDP1, XLA and SageMaker model parallel have their own
optimizer checkpoint formats: there the base behaviour is kept, with a warning.

Nothing read on resume is unpickled with arbitrary objects: hf_optim reads safetensors + JSON, and transformers
5.x reads ``rng_state*.pth``, ``scaler.pt`` and legacy ``optimizer.pt`` / ``scheduler.pt`` with
``torch.load(weights_only=True)`` (model weights as safetensors, or ``weights_only=True``); ``training_args.bin``
is written but never read back. The native backends above load their own files their own way.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from typing import TYPE_CHECKING, Any

import torch
import transformers

from hf_optim._utils import is_hub_url
from hf_optim.hub import download_checkpoint
from hf_optim.integrations.deepspeed import (
    has_zero_state,
    is_zero,
    load_zero_state,
    save_zero_state,
    weights_loader,
)
from hf_optim.integrations.transformers.bridge import registered_names
from hf_optim.integrations.transformers.resume import (
    LEGACY_OPTIMIZER_NAMES,
    TRAINER_STATE_NAME,
    load_hf_optim_state,
    patch_trainer_resume,
)
from hf_optim.registry import get_scheduler, list_schedulers
from hf_optim.state import (
    OPTIMIZER_INDEX_NAME,
    OPTIMIZER_NAME,
    SHARDED_MANIFEST_NAME,
    load_state,
    save_state,
)

logger = logging.getLogger(__name__)

# Plain transformers.Trainer in the same process resumes from hf_optim's state too (the start-up hook does this
# wherever transformers.trainer is imported; here it is certain).
patch_trainer_resume(sys.modules[transformers.Trainer.__module__])

__all__ = ["LEGACY_OPTIMIZER_NAMES", "Trainer", "TrainerMixin", "download_trainer_checkpoint"]


def download_trainer_checkpoint(url: str, token: str | bool | None = None) -> str:
    """Download a Trainer checkpoint folder (``hf://USER/REPO[@REVISION]/SUBFOLDER`` or its huggingface.co web
    URL) with :func:`hf_optim.download_checkpoint` and check that it is one (``trainer_state.json``); return the
    folder."""
    directory = download_checkpoint(url, token=token)
    if not os.path.isfile(os.path.join(directory, TRAINER_STATE_NAME)):
        raise FileNotFoundError(
            f"{url} is not a Trainer checkpoint: no {TRAINER_STATE_NAME} in it ({directory})"
        )
    return directory


def _name_param_groups(optimizer: torch.optim.Optimizer, model: torch.nn.Module | None) -> None:
    """Give the groups Trainer built ``param_names`` from the model, so checkpoints key state by name."""
    if model is None or any("param_names" in group for group in optimizer.param_groups):
        return
    names = {p: n for n, p in model.named_parameters()}
    if all(p in names for group in optimizer.param_groups for p in group["params"]):
        for group in optimizer.param_groups:
            group["param_names"] = [names[p] for p in group["params"]]


class TrainerMixin:
    """Safetensors optimizer / scheduler checkpoints and ``hf://`` resume for any ``transformers.Trainer``.

    Put it first in the bases: ``class MyTrainer(TrainerMixin, Seq2SeqTrainer): ...``. It overrides
    ``_save_optimizer_and_scheduler`` and ``_load_optimizer_and_scheduler`` (transformers' loader silently skips
    when ``optimizer.pt`` is absent, so both are needed), ``create_optimizer`` (to tag hf_optim optimizers with
    their registry name) and ``train`` (to download ``hf://`` checkpoints).

    Raises:
        CheckpointError: From ``train(resume_from_checkpoint=...)`` when the checkpoint's optimizer state is
            corrupted or does not match the optimizer (nothing is loaded then).

    Example:
        ```python
        import transformers
        import hf_optim


        class MySeq2SeqTrainer(hf_optim.TrainerMixin, transformers.Seq2SeqTrainer):
            pass


        assert MySeq2SeqTrainer.__mro__[1] is hf_optim.TrainerMixin
        ```
    """

    #: fsync the state files. Off by default, like the rest of a Trainer checkpoint (transformers does not fsync
    #: the model or RNG files either); the write stays atomic against a killed process. Set True to survive
    #: power loss at the cost of a slower save.
    hf_optim_fsync: bool = False
    _hf_optim_fallback_warned = False

    if TYPE_CHECKING:  # set by the transformers.Trainer this is mixed into
        args: transformers.TrainingArguments
        model: torch.nn.Module
        model_wrapped: torch.nn.Module
        optimizer: torch.optim.Optimizer  # created by create_optimizer before a checkpoint is saved or loaded
        lr_scheduler: Any

    # ---- helpers -------------------------------------------------------------------------------------------

    def _hf_optim_native_backend(self) -> str | None:
        """The name of the backend whose own optimizer checkpointing must be kept, if any."""
        if getattr(self, "is_deepspeed_enabled", False):
            return None if self._hf_optim_zero() else "DeepSpeed"
        if self._hf_optim_fsdp2():
            return None  # sharded optimizer state: hf_optim saves it per process
        if getattr(self, "is_fsdp_enabled", False) or getattr(self, "is_fsdp_xla_enabled", False):
            return "FSDP"
        utils = transformers.utils
        if getattr(utils, "is_torch_xla_available", lambda: False)():
            return "XLA"
        if getattr(utils, "is_sagemaker_mp_enabled", lambda: False)():
            return "SageMaker model parallel"
        return None

    def _hf_optim_zero(self) -> bool:
        """DeepSpeed ZeRO, prepared: every process saves and loads its own partition of the optimizer state."""
        optimizer = getattr(self, "optimizer", None)
        return (
            bool(getattr(self, "is_deepspeed_enabled", False))
            and optimizer is not None
            and is_zero(optimizer, getattr(self, "model_wrapped", None))
        )

    def _hf_optim_fsdp2(self) -> bool:
        """FSDP2 (``fully_shard``): every process saves and loads its own shard of the optimizer state."""
        accelerator = getattr(self, "accelerator", None)
        return bool(getattr(self, "is_fsdp_enabled", False) and getattr(accelerator, "is_fsdp2", False))

    def _hf_optim_warn_fallback(self, backend: str) -> None:
        if not self._hf_optim_fallback_warned:
            self._hf_optim_fallback_warned = True
            logger.warning(
                "hf_optim.Trainer: %s saves and loads optimizer state its own way; using transformers' "
                "checkpoint format for optimizer and scheduler (not safetensors).",
                backend,
            )

    # ---- optimizer ------------------------------------------------------------------------------------------

    def create_optimizer(self, *args: Any, **kwargs: Any) -> Any:
        created_here = getattr(self, "optimizer", None) is None
        optimizer = super().create_optimizer(*args, **kwargs)  # type: ignore[misc]  # the Trainer this is mixed into has it
        if not created_here or optimizer is None:
            return optimizer
        # Not wrapped yet (Accelerate wraps it in train()), except by SageMaker MP, a native backend.
        name = getattr(self.args.optim, "value", self.args.optim)
        if name in registered_names()["optimizers"]:
            with contextlib.suppress(AttributeError):
                optimizer.hf_optim_name = name
        if self._hf_optim_native_backend() is None:
            _name_param_groups(optimizer, self.model)
        return optimizer

    def create_scheduler(
        self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None
    ) -> Any:
        """transformers' ``create_scheduler``, building hf_optim's schedule of the same name when there is one.

        hf_optim's schedules give exactly transformers' learning rates and carry their name and arguments, so
        ``scheduler.json`` describes the schedule (``hf-optim inspect``, rebuilding without code).
        """
        name = getattr(self.args.lr_scheduler_type, "value", self.args.lr_scheduler_type)
        if (
            self.lr_scheduler is None
            and self._hf_optim_native_backend() is None
            and name in list_schedulers()
        ):
            self.lr_scheduler = get_scheduler(
                name,
                optimizer if optimizer is not None else self.optimizer,
                num_warmup_steps=self.args.get_warmup_steps(num_training_steps),
                num_training_steps=num_training_steps,
                scheduler_specific_kwargs=self.args.lr_scheduler_kwargs,
            )
            self._created_lr_scheduler = True
        return super().create_scheduler(num_training_steps, optimizer)  # type: ignore[misc]  # the Trainer this is mixed into has it

    # ---- checkpoints ----------------------------------------------------------------------------------------

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        backend = self._hf_optim_native_backend()
        if backend is not None:
            self._hf_optim_warn_fallback(backend)
            return super()._save_optimizer_and_scheduler(output_dir)  # type: ignore[misc]  # the Trainer this is mixed into has it
        if self._hf_optim_zero():  # a collective: every process writes its partition
            save_zero_state(output_dir, self.optimizer, self.lr_scheduler, self.model_wrapped)
            return None
        if self._hf_optim_fsdp2():  # a collective: every process writes its shard
            save_state(output_dir, self.optimizer, scheduler=self.lr_scheduler, model=self.model)
            return None
        if not self.args.should_save:
            return None
        save_state(output_dir, self.optimizer, scheduler=self.lr_scheduler, fsync=self.hf_optim_fsync)
        return None

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is None:
            return None
        backend = self._hf_optim_native_backend()
        if backend is not None:
            self._hf_optim_warn_fallback(backend)
            return super()._load_optimizer_and_scheduler(checkpoint)  # type: ignore[misc]  # the Trainer this is mixed into has it
        if self._hf_optim_zero():  # DeepSpeed's own checkpoint was loaded whole by deepspeed_load_checkpoint
            if has_zero_state(checkpoint):
                load_zero_state(checkpoint, self.optimizer, self.lr_scheduler, self.model_wrapped)
            return None
        if self._hf_optim_fsdp2() and os.path.isfile(os.path.join(checkpoint, SHARDED_MANIFEST_NAME)):
            load_state(checkpoint, self.optimizer, scheduler=self.lr_scheduler, model=self.model)
            logger.info("Loaded sharded optimizer and scheduler state from %s", checkpoint)
            return None
        # On the files, not has_state(): a corrupt state file must fail in load_state, naming the problem.
        if any(os.path.isfile(os.path.join(checkpoint, n)) for n in (OPTIMIZER_NAME, OPTIMIZER_INDEX_NAME)):
            load_hf_optim_state(self, checkpoint, model=self.model if self._hf_optim_fsdp2() else None)
            return None
        if any(os.path.isfile(os.path.join(checkpoint, name)) for name in LEGACY_OPTIMIZER_NAMES):
            logger.info("%s is a legacy checkpoint (optimizer.pt): loading it with transformers", checkpoint)
            return super()._load_optimizer_and_scheduler(checkpoint)  # type: ignore[misc]  # the Trainer this is mixed into has it
        logger.warning(
            "No optimizer state in %s (neither optimizer.safetensors nor optimizer.pt): optimizer and schedule "
            "start fresh",
            checkpoint,
        )
        return None

    # ---- training -------------------------------------------------------------------------------------------

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any) -> Any:
        """``transformers.Trainer.train``; ``resume_from_checkpoint`` may also be ``hf://USER/REPO[@REV]/SUBDIR``
        (or its huggingface.co web URL), which is downloaded (main process first, into the HF cache) before
        resuming."""
        if isinstance(resume_from_checkpoint, str) and is_hub_url(resume_from_checkpoint):
            url = resume_from_checkpoint
            with self.args.main_process_first(desc="downloading the checkpoint"):
                resume_from_checkpoint = download_trainer_checkpoint(url, token=self.args.hub_token)
            logger.info("Resuming from %s (downloaded to %s)", url, resume_from_checkpoint)
        deepspeed = getattr(self, "is_deepspeed_enabled", False)
        checkpoint = resume_from_checkpoint if deepspeed and isinstance(resume_from_checkpoint, str) else None
        with weights_loader(checkpoint):  # hf_optim's state: no global_stepN
            return super().train(resume_from_checkpoint, *args, **kwargs)  # type: ignore[misc]  # the Trainer this is mixed into has it


class Trainer(TrainerMixin, transformers.Trainer):
    """Drop-in ``transformers.Trainer`` that checkpoints optimizer and scheduler in safetensors / JSON.

    See :class:`TrainerMixin`. Importing it registers hf_optim's names with transformers (``optim="adamw_hf"``).
    It takes ``transformers.Trainer``'s arguments; checkpoints hold ``optimizer.safetensors`` and
    ``scheduler.json`` instead of pickles, and ``train(resume_from_checkpoint="hf://user/repo/checkpoint-N")``
    resumes from the Hub.

    Raises:
        CheckpointError: From ``train(resume_from_checkpoint=...)`` when the checkpoint's optimizer state is
            corrupted or does not match the optimizer (nothing is loaded then).

    Example:
        ```python
        import os
        import torch
        import hf_optim
        from transformers import TrainingArguments


        class Regression(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.linear = torch.nn.Linear(4, 1)

            def forward(self, x, labels=None):
                out = self.linear(x).squeeze(-1)
                return {"loss": torch.nn.functional.mse_loss(out, labels), "logits": out}


        data = [{"x": torch.randn(4), "labels": torch.randn(())} for _ in range(8)]
        args = TrainingArguments(
            "out", optim="adamw_hf", max_steps=2, save_steps=2, per_device_train_batch_size=4, report_to=[], use_cpu=True
        )
        hf_optim.Trainer(model=Regression(), args=args, train_dataset=data).train()
        assert os.path.isfile(f"out/checkpoint-2/{hf_optim.OPTIMIZER_NAME}")
        ```
    """
