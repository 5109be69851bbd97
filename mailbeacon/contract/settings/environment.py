"""Flat names for nested settings: the environment and keyword arguments stay flat
(``MAILBEACON_TRACKER_LISTEN``, ``Settings(tracker_listen=...)``) while the model is grouped
by component (``settings.tracker.listen``).

The rule, the one pydantic-settings applies to top-level fields: a field is read from
the variables in its ``validation_alias`` (the first one set wins), else from
``MAILBEACON_<FIELD NAME>``. Its flat keyword is that first variable without the prefix,
in lower case. Only these variables are read: a group's name (``MAILBEACON_TRACKER``) is
never parsed as JSON, and unknown variables are ignored.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import AliasChoices, BaseModel
from pydantic.fields import FieldInfo
from pydantic_settings import EnvSettingsSource, SettingsError

PREFIX = "MAILBEACON_"


@dataclass(frozen=True)
class Variable:
    """One setting: where it sits in the model and which environment variables set it."""

    group: str | None  # the Settings attribute of its group; None for a shared field
    field: str  # its name in the group (or in Settings)
    names: tuple[str, ...]  # its environment variables, in priority order
    info: FieldInfo

    @property
    def keyword(self) -> str:
        """The flat keyword argument, e.g. ``tracker_listen``."""
        return self.names[0].removeprefix(PREFIX).lower()

    @property
    def path(self) -> str:
        """Where it is read, e.g. ``tracker.listen``."""
        return f"{self.group}.{self.field}" if self.group else self.field


def _names(field: str, info: FieldInfo) -> tuple[str, ...]:
    alias = info.validation_alias
    if isinstance(alias, str):
        return (alias,)
    if isinstance(alias, AliasChoices):
        return tuple(choice for choice in alias.choices if isinstance(choice, str))
    return (PREFIX + field.upper(),)


def group_class(info: FieldInfo) -> type[BaseModel] | None:
    """The model of a group field of Settings, None for a plain field."""
    annotation = info.annotation
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


@functools.cache
def settings_variables(settings_cls: type[BaseModel]) -> tuple[Variable, ...]:
    """Every setting of ``settings_cls``, shared ones first, then each group's, in declaration order."""
    found: list[Variable] = []
    for name, info in settings_cls.model_fields.items():
        group = group_class(info)
        if group is None:
            found.append(Variable(None, name, _names(name, info), info))
        else:
            found.extend(
                Variable(name, sub, _names(sub, sub_info), sub_info)
                for sub, sub_info in group.model_fields.items()
            )
    return tuple(found)


@functools.cache
def _group_fields(settings_cls: type[BaseModel]) -> dict[str, tuple[str, str, tuple[str, ...]]]:
    """Flat keyword -> (group, field, variables), for the groups' fields."""
    return {
        variable.keyword: (variable.group, variable.field, variable.names)
        for variable in settings_variables(settings_cls)
        if variable.group
    }


def route(settings_cls: type[BaseModel], data: Mapping[str, Any]) -> dict[str, Any]:
    """Move flat keywords of group fields into their group: ``{"tracker_listen": x}`` becomes
    ``{"tracker": {"listen": x}}``. A flat keyword wins over the same field given nested."""
    fields = _group_fields(settings_cls)
    routed: dict[str, Any] = {}
    flat: list[tuple[tuple[str, str, tuple[str, ...]], Any]] = []
    for key, value in data.items():
        where = fields.get(key.lower())
        if where is None:
            routed[key] = value  # shared fields, groups, and what is unknown (ignored later)
        else:
            flat.append((where, value))
    for (group, field, names), value in flat:
        given = routed.get(group)
        if isinstance(given, BaseModel):
            values = {name: getattr(given, name) for name in given.model_fields_set}
        else:
            values = dict(given) if isinstance(given, Mapping) else {}
        for alias in names:
            values.pop(alias, None)
        values[field] = value
        routed[group] = values
    return routed


class FlatEnvironment(EnvSettingsSource):
    """Reads every field, the groups' too, from its own variable, with the parsing of
    pydantic-settings' environment source (NoDecode lists, JSON for dict fields)."""

    def __call__(self) -> dict[str, Any]:
        data: dict[str, Any] = {}
        for variable in settings_variables(self.settings_cls):
            names = variable.names if self.case_sensitive else [name.lower() for name in variable.names]
            raw = next((self.env_vars[name] for name in names if self.env_vars.get(name) is not None), None)
            if raw is None:
                continue
            try:
                value = self.prepare_field_value(variable.field, variable.info, raw, False)
            except ValueError as exc:
                raise SettingsError(
                    f'error parsing value for field "{variable.keyword}" from the environment'
                ) from exc
            if value is not None:
                target = data.setdefault(variable.group, {}) if variable.group else data
                target[variable.field] = value
        return data
