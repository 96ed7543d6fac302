"""The :class:`Registry`: optimizer and schedule entries by name, other libraries' optimizer providers, listeners.

Names are matched exactly first, then case-insensitively when that picks one entry (``"AdamW_HF"`` is
``adamw_hf``); suggestions for an unknown name are matched case-insensitively too.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import nn

from hf_optim.registry._lookup import (
    PROVIDER_MODULES,
    build_optimizer,
    build_scheduler,
    casefold_match,
    filter_names,
    import_provider_library,
    scheduler_name,
    unknown_name,
)
from hf_optim.registry.records import (
    HF_OPTIM_SOURCE,
    OptimizerInfo,
    OptimizerProvider,
    SchedulerInfo,
    check_arg_names,
    check_mapping,
    check_name,
)

logger = logging.getLogger("hf_optim.registry")

__all__ = ["Listener", "Registry", "RegistryKind"]

RegistryKind = Literal["optimizer", "scheduler"]
Listener = Callable[[RegistryKind, Any], None]


class Registry:
    """Optimizer and schedule entries by name, optimizer providers of other libraries, and listeners.

    Thread-safe; :data:`default_registry` is the instance behind hf_optim's module-level functions.
    """

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._optimizers: dict[str, OptimizerInfo] = {}
        self._schedulers: dict[str, SchedulerInfo] = {}
        self._listeners: list[Listener] = []
        self._providers: dict[str, OptimizerProvider] = {}

    # --- registration -------------------------------------------------------------------------------------------

    def register_optimizer(
        self,
        name: str,
        factory: Callable[..., torch.optim.Optimizer],
        *,
        description: str = "",
        defaults: Mapping[str, Any] | None = None,
        arg_names: Mapping[str, str | Sequence[str]] | None = None,
        overwrite: bool = False,
    ) -> OptimizerInfo:
        """Register ``factory`` (e.g. an optimizer class) as ``name``; an existing name raises unless ``overwrite``.

        Args:
            name: The name to register (letters, digits, ``_``, ``-`` and ``.``).
            factory: Called as ``factory(params, **kwargs)``; an optimizer class or a function.
            description: One line for ``hf-optim list``.
            defaults: Arguments used when the caller does not give them.
            arg_names: The factory's own names of the common arguments (``{"lr": "learning_rate"}``).
            overwrite: Replace an existing entry of the same name.

        Returns:
            The frozen record of the entry.

        Raises:
            TypeError: If ``defaults`` is not a mapping with string keys, or an ``arg_names`` value is not a name.
            ValueError: If the name is invalid or taken, ``factory`` is not callable, or an ``arg_names`` key is
                not a common argument.

        Example:
            ```python
            import torch
            import hf_optim

            registry = hf_optim.registry.Registry()  # a private registry; hf_optim.register_optimizer is the shared one's
            registry.register_optimizer("sgd_momentum", torch.optim.SGD, defaults={"momentum": 0.9})
            optimizer = registry.create_optimizer("sgd_momentum", [torch.nn.Parameter(torch.zeros(2))], lr=0.1)
            assert optimizer.defaults["momentum"] == 0.9
            ```
        """
        check_name(name, "optimizer")
        if not callable(factory):
            raise ValueError(f"factory for optimizer {name!r} must be callable, got {factory!r}")
        info = OptimizerInfo(
            name=name,
            factory=factory,
            description=str(description),
            defaults=check_mapping(defaults, "defaults"),
            arg_names=check_arg_names(arg_names),
        )
        with self._lock:
            if name in self._optimizers and not overwrite:
                raise ValueError(
                    f"optimizer {name!r} is already registered; pass overwrite=True to replace it"
                )
            self._optimizers[name] = info
            listeners = list(self._listeners)
        self._notify("optimizer", info, listeners)
        return info

    def register_scheduler(
        self, name: str, factory: Callable[..., Any], *, description: str = "", overwrite: bool = False
    ) -> SchedulerInfo:
        """Register a schedule ``factory(optimizer, ...)`` as ``name``; an existing name raises unless
        ``overwrite``.

        Args:
            name: The name to register.
            factory: Called as ``factory(optimizer, **kwargs)``; returns a learning-rate scheduler.
            description: One line for ``hf-optim list``.
            overwrite: Replace an existing entry of the same name.

        Returns:
            The frozen record of the entry.

        Raises:
            ValueError: If the name is invalid or taken, or ``factory`` is not callable.

        Example:
            ```python
            import torch
            import hf_optim

            registry = hf_optim.registry.Registry()
            registry.register_scheduler("halved", lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5))
            optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
            assert registry.get_scheduler("halved", optimizer).get_last_lr() == [0.5]
            ```
        """
        check_name(name, "scheduler")
        if not callable(factory):
            raise ValueError(f"factory for scheduler {name!r} must be callable, got {factory!r}")
        info = SchedulerInfo(name=name, factory=factory, description=str(description))
        with self._lock:
            if name in self._schedulers and not overwrite:
                raise ValueError(
                    f"scheduler {name!r} is already registered; pass overwrite=True to replace it"
                )
            self._schedulers[name] = info
            listeners = list(self._listeners)
        self._notify("scheduler", info, listeners)
        return info

    def add_optimizer_provider(self, provider: OptimizerProvider) -> None:
        """Look names up in ``provider`` too (after the registry's own entries); replaces a provider with the
        same ``source``."""
        source = getattr(provider, "source", None)
        if not isinstance(source, str) or source == HF_OPTIM_SOURCE:
            raise ValueError(
                f"provider.source must be a library name other than {HF_OPTIM_SOURCE!r}, got {source!r}"
            )
        with self._lock:
            self._providers[source] = provider

    def remove_optimizer_provider(self, source: str) -> None:
        """Forget the provider of ``source`` (no error if there is none)."""
        with self._lock:
            self._providers.pop(source, None)

    # --- listeners ----------------------------------------------------------------------------------------------

    @staticmethod
    def _notify(kind: RegistryKind, info: Any, listeners: Iterable[Listener]) -> None:
        for listener in listeners:
            try:
                listener(kind, info)
            except Exception:
                logger.exception("hf_optim registry listener %r failed for %s %r", listener, kind, info.name)

    def add_listener(self, callback: Listener) -> Listener:
        """Call ``callback(kind, info)`` now for every registered entry and later for each new registration.

        A listener that raises is logged and otherwise ignored: it never breaks registration. Provider entries are
        not registrations: listeners do not hear about them. This is how the transformers integration keeps
        ``TrainingArguments``' choices in step with the registry.

        Args:
            callback: Called as ``callback(kind, info)`` with ``kind`` ``"optimizer"`` or ``"scheduler"`` and the
                entry's record.

        Returns:
            ``callback``, so that it can be used as a decorator.

        Raises:
            ValueError: If ``callback`` is not callable.

        Example:
            ```python
            import torch
            import hf_optim

            registry = hf_optim.registry.Registry()
            heard = []
            registry.add_listener(lambda kind, info: heard.append((kind, info.name)))
            registry.register_optimizer("plain_sgd", torch.optim.SGD)
            assert heard == [("optimizer", "plain_sgd")]
            ```
        """
        if not callable(callback):
            raise ValueError(f"callback must be callable, got {callback!r}")
        with self._lock:
            if callback not in self._listeners:
                self._listeners.append(callback)
            optimizers = list(self._optimizers.values())
            schedulers = list(self._schedulers.values())
        for optimizer_info in optimizers:
            self._notify("optimizer", optimizer_info, [callback])
        for scheduler_info in schedulers:
            self._notify("scheduler", scheduler_info, [callback])
        return callback

    def remove_listener(self, callback: Listener) -> None:
        """Stop calling ``callback`` (no error if it was not registered).

        Args:
            callback: A listener given to :meth:`add_listener`.

        Example:
            ```python
            import hf_optim

            listener = hf_optim.add_registry_listener(lambda kind, info: None)
            hf_optim.remove_registry_listener(listener)
            ```
        """
        with self._lock:
            if callback in self._listeners:
                self._listeners.remove(callback)

    @contextlib.contextmanager
    def snapshot(self, *, hooks: bool = False) -> Iterator[Registry]:
        """Restore the registered entries on exit, whatever the body registered or overwrote.

        With ``hooks=True`` listeners and providers are restored too; by default they are left as they are
        (integrations add theirs once per process, whenever their library is first imported). Restoring does not
        notify listeners. The containers stay the same objects.
        """
        with self._lock:
            saved = (
                dict(self._optimizers),
                dict(self._schedulers),
                list(self._listeners),
                dict(self._providers),
            )
        try:
            yield self
        finally:
            with self._lock:
                self._optimizers.clear()
                self._optimizers.update(saved[0])
                self._schedulers.clear()
                self._schedulers.update(saved[1])
                if hooks:
                    self._listeners[:] = saved[2]
                    self._providers.clear()
                    self._providers.update(saved[3])

    # --- lookup -------------------------------------------------------------------------------------------------

    def _provider_list(self, load: bool) -> list[OptimizerProvider]:
        if load:
            for source in PROVIDER_MODULES:
                import_provider_library(source)
        with self._lock:
            return list(self._providers.values())

    def list_optimizers(
        self, pattern: str | Sequence[str] | None = None, *, source: str | Sequence[str] | None = None
    ) -> list[str]:
        """Sorted optimizer names, optionally filtered by shell-style wildcards (``"adam*"``) and by ``source``
        (``"hf_optim"``: the registry's own entries; ``"transformers"``: transformers' own ``optim`` names).

        Listing another source than ``"hf_optim"`` imports that library if it is installed and not yet loaded.

        Args:
            pattern: Shell-style wildcards; a name matching any of them is listed. ``None``: every name.
            source: Only the names of this library (or these libraries). ``None``: all.

        Returns:
            The sorted names.

        Example:
            ```python
            import hf_optim

            assert "adamw_hf" in hf_optim.list_optimizers("adamw*", source="hf_optim")
            ```
        """
        sources = None if source is None else ({source} if isinstance(source, str) else set(source))
        names: set[str] = set()
        with self._lock:
            if sources is None or HF_OPTIM_SOURCE in sources:
                names.update(self._optimizers)
        wanted_providers = sources is None or bool(sources - {HF_OPTIM_SOURCE})
        if wanted_providers:
            for provider in self._provider_list(load=True):
                if sources is None or provider.source in sources:
                    names.update(provider.names())
        return filter_names(names, pattern)

    def list_schedulers(self, pattern: str | Sequence[str] | None = None) -> list[str]:
        """Sorted registered schedule names, optionally filtered by shell-style wildcards (``"cosine*"``).

        Args:
            pattern: Shell-style wildcards; a name matching any of them is listed. ``None``: every name.

        Returns:
            The sorted names.

        Example:
            ```python
            import hf_optim

            assert "cosine_with_restarts" in hf_optim.list_schedulers("cosine*")
            ```
        """
        with self._lock:
            return filter_names(self._schedulers, pattern)

    def get_optimizer_info(self, name: str) -> OptimizerInfo:
        """The record of ``name``: the registry's own entry, else a provider's (e.g. transformers' ``optim`` names).

        Args:
            name: An optimizer name.

        Returns:
            Its record: factory, description, defaults and argument names.

        Raises:
            ValueError: If there is no such optimizer (the message lists the closest names).

        Example:
            ```python
            import hf_optim

            info = hf_optim.get_optimizer_info("adamw_hf")
            assert info.factory is hf_optim.AdamW
            ```
        """
        if not isinstance(name, str):
            raise unknown_name("optimizer", name, self.list_optimizers(source=HF_OPTIM_SOURCE))
        with self._lock:
            info = self._optimizers.get(name)
        if info is not None:
            return info
        for provider in self._provider_list(load=True):
            info = provider.info(name)
            if info is not None:
                return info
        folded = casefold_match(name, self.list_optimizers())
        if folded is not None:
            return self.get_optimizer_info(folded)
        own = self.list_optimizers(source=HF_OPTIM_SOURCE)
        error = unknown_name("optimizer", name, own, candidates=self.list_optimizers())
        others = sorted(p.source for p in self._provider_list(load=False))
        if others:
            error.args = (
                f"{error.args[0]} (and those of {', '.join(others)}: see hf_optim.list_optimizers())",
            )
        raise error

    def get_scheduler_info(self, name: str) -> SchedulerInfo:
        """The record registered as ``name`` (a name differing only in case is found too).

        Args:
            name: A schedule name.

        Returns:
            Its record: factory and description.

        Raises:
            ValueError: If there is no such schedule (the message lists the closest names).

        Example:
            ```python
            import hf_optim

            assert hf_optim.get_scheduler_info("linear").factory is hf_optim.get_linear_schedule_with_warmup
            ```
        """
        with self._lock:
            info = self._schedulers.get(name) if isinstance(name, str) else None
            if info is None and isinstance(name, str):
                folded = casefold_match(name, self._schedulers)
                info = self._schedulers.get(folded) if folded is not None else None
            if info is None:
                raise unknown_name("scheduler", name, self._schedulers)
            return info

    def optimizer_name(self, optimizer: Any) -> str | None:
        """The registry name of ``optimizer``: its ``hf_optim_name``, else the entry whose factory is its class or
        its nearest registered base class. Wrappers that keep the real optimizer in ``.optimizer``
        (``AcceleratedOptimizer``) are unwrapped. Saved state records it, so a checkpoint names its optimizer.

        Args:
            optimizer: An optimizer, or a wrapper around one.

        Returns:
            The registry name, or ``None`` for an optimizer the registry does not know.

        Example:
            ```python
            import torch
            import hf_optim

            optimizer = hf_optim.AdamW([torch.nn.Parameter(torch.zeros(1))])
            assert hf_optim.optimizer_name(optimizer) == "adamw_hf"
            ```
        """
        seen = 0
        while optimizer is not None and seen < 8:
            name = getattr(optimizer, "__dict__", {}).get("hf_optim_name")
            if isinstance(name, str):
                return name
            with self._lock:
                by_factory = {id(info.factory): info.name for info in self._optimizers.values()}
            for cls in type(
                optimizer
            ).__mro__:  # its class, else the nearest registered base (hf_optim.legacy's)
                if id(cls) in by_factory:
                    return by_factory[id(cls)]
            optimizer = getattr(optimizer, "optimizer", None)
            seen += 1
        return None

    # --- creation -----------------------------------------------------------------------------------------------

    def create_optimizer(
        self, name: str, model_or_params: nn.Module | Iterable[Any], **kwargs: Any
    ) -> torch.optim.Optimizer:
        """Build the optimizer called ``name`` (an entry of the registry or of a provider, e.g. ``adamw_torch``).

        Given an ``nn.Module``, its trainable parameters are split by name into a decay group and a no-decay group
        (biases and normalisation weights, see :func:`hf_optim.param_groups.group_parameters`;
        ``include_in_weight_decay`` / ``exclude_from_weight_decay`` regexes override, with AdamWeightDecay's rule)
        and passed as named parameters. Anything else (parameters, named parameters, group dicts) is passed
        through. ``lr``, ``weight_decay``, ``betas`` and ``eps`` are renamed to the optimizer's own argument
        names. The result carries ``hf_optim_name = name``.

        Args:
            name: A registered optimizer name (``hf_optim.list_optimizers()``).
            model_or_params: A model (grouped for weight decay) or what ``torch.optim`` optimizers accept.
            **kwargs: The optimizer's arguments, under its own names or the common ones above.

        Returns:
            The optimizer, with ``hf_optim_name`` set.

        Raises:
            ValueError: An unknown name, or an argument the optimizer does not take.

        Example:
            ```python
            import torch
            import hf_optim

            model = torch.nn.Linear(4, 2)
            optimizer = hf_optim.create_optimizer("adamw_hf", model, lr=3e-4, weight_decay=0.01)
            assert optimizer.hf_optim_name == "adamw_hf"
            ```
        """
        return build_optimizer(self.get_optimizer_info(name), name, model_or_params, kwargs)

    def create_scheduler(
        self,
        name: str,
        optimizer: torch.optim.Optimizer,
        num_warmup_steps: int | None = None,
        num_training_steps: int | None = None,
        **kwargs: Any,
    ) -> Any:
        """Build the schedule registered as ``name`` for ``optimizer``.

        ``num_warmup_steps`` / ``num_training_steps`` go only to schedules that take them; a schedule that
        requires an argument that is missing raises ``ValueError`` naming it, and so does an argument it does not
        take. The result carries ``hf_optim_config = {"name": name, "kwargs": {every argument but optimizer and
        last_epoch}}``, from which :func:`hf_optim.scheduler_from_config` rebuilds it.

        Args:
            name: A registered schedule name.
            optimizer: The optimizer whose learning rate is scheduled.
            num_warmup_steps: Warmup length, for schedules that take it.
            num_training_steps: Total length, for schedules that take it.
            **kwargs: The schedule's other arguments.

        Returns:
            The scheduler, with ``hf_optim_config`` set.

        Raises:
            ValueError: If the name is unknown, an argument is missing or not taken, or an argument cannot be
                represented in JSON.

        Example:
            ```python
            import torch
            import hf_optim

            optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
            scheduler = hf_optim.create_scheduler("cosine", optimizer, num_warmup_steps=0, num_training_steps=10)
            assert scheduler.hf_optim_config["kwargs"]["num_cycles"] == 0.5
            ```
        """
        info = self.get_scheduler_info(name)
        return build_scheduler(info, name, optimizer, num_warmup_steps, num_training_steps, kwargs)

    def get_scheduler(
        self,
        name: str,
        optimizer: torch.optim.Optimizer,
        num_warmup_steps: int | None = None,
        num_training_steps: int | None = None,
        scheduler_specific_kwargs: Mapping[str, Any] | None = None,
        **scheduler_kwargs: Any,
    ) -> Any:
        """Build the schedule ``name`` (a str or transformers ``SchedulerType``), like ``transformers.get_scheduler``.

        ``num_warmup_steps`` / ``num_training_steps`` are passed only to schedules that take them (Trainer always
        passes both); a schedule that requires one raises ``ValueError`` when it is missing. Extra arguments come
        as keywords or, as in ``transformers.get_scheduler``, in ``scheduler_specific_kwargs``.

        Args:
            name: A registered schedule name (``hf_optim.list_schedulers()``).
            optimizer: The optimizer whose learning rate is scheduled.
            num_warmup_steps: Warmup length, in optimizer steps.
            num_training_steps: Total length, in optimizer steps.
            scheduler_specific_kwargs: The schedule's other arguments (transformers' spelling).
            **scheduler_kwargs: The schedule's other arguments, as keywords.

        Returns:
            The schedule (a ``torch.optim.lr_scheduler.LambdaLR`` for transformers' schedules), carrying its JSON
            description in ``hf_optim_config``.

        Raises:
            ValueError: An unknown name, a missing or unexpected argument, or an argument given twice.

        Example:
            ```python
            import torch
            import hf_optim

            optimizer = torch.optim.SGD(torch.nn.Linear(4, 2).parameters(), lr=1.0)
            scheduler = hf_optim.get_scheduler("linear", optimizer, num_warmup_steps=2, num_training_steps=10)
            assert scheduler.get_last_lr() == [0.0]
            ```
        """
        kwargs = dict(scheduler_specific_kwargs or {})
        duplicated = sorted(set(kwargs) & set(scheduler_kwargs))
        if duplicated:
            raise ValueError(
                f"scheduler argument(s) {duplicated} given both as keywords and in scheduler_specific_kwargs"
            )
        kwargs.update(scheduler_kwargs)
        return self.create_scheduler(
            scheduler_name(name), optimizer, num_warmup_steps, num_training_steps, **kwargs
        )

    def scheduler_from_config(
        self, optimizer: torch.optim.Optimizer, config: Mapping[str, Any], last_epoch: int = -1
    ) -> Any:
        """Rebuild a scheduler from its ``hf_optim_config`` (``{"name": ..., "kwargs": {...}}``) for ``optimizer``.

        To resume, rebuild with the default ``last_epoch=-1`` and then ``load_state_dict`` the saved state. This is
        how a checkpoint restores a schedule without pickled code.

        Args:
            optimizer: The optimizer to schedule.
            config: A scheduler's ``hf_optim_config``.
            last_epoch: Passed to the schedule when not -1.

        Returns:
            The rebuilt scheduler.

        Raises:
            TypeError: If ``config`` is not ``{"name": str, "kwargs": mapping}``.
            ValueError: If its name is unknown or its arguments do not fit the schedule.

        Example:
            ```python
            import torch
            import hf_optim

            optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
            original = hf_optim.get_scheduler("linear", optimizer, num_warmup_steps=2, num_training_steps=10)
            rebuilt = hf_optim.scheduler_from_config(optimizer, original.hf_optim_config)
            assert rebuilt.lr_lambdas[0](5) == original.lr_lambdas[0](5) == 0.625
            ```
        """
        if not isinstance(config, Mapping) or not isinstance(config.get("name"), str):
            raise TypeError(f'config must be a mapping {{"name": str, "kwargs": dict}}, got {config!r}')
        kwargs = config.get("kwargs", {})
        if not isinstance(kwargs, Mapping):
            raise TypeError(f"config['kwargs'] must be a mapping of argument names to values, got {kwargs!r}")
        kwargs = dict(kwargs)
        if last_epoch != -1:
            kwargs["last_epoch"] = last_epoch
        return self.create_scheduler(config["name"], optimizer, **kwargs)
