"""The device inventory (`devices/inventory.yaml`): which boards exist and how to reach them.

Connection details beyond the host (keys, ProxyJump, aliases) belong in the
user's `~/.ssh/config`; an entry names the host alias and edgeopt passes it
through to OpenSSH unchanged. Values end up in ssh argv and remote commands,
so names are restricted to characters that need no shell quoting.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from edgeopt.errors import InputError, unknown_name
from edgeopt.yamlio import load_model_yaml

INVENTORY_PATH = Path(__file__).resolve().parents[2] / "devices" / "inventory.yaml"
_SAFE = r"^[A-Za-z0-9_][A-Za-z0-9_.@+-]*$"
_SAFE_PATH = r"^[A-Za-z0-9_./~+-]+$"


class Device(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=_SAFE)
    host: str = Field(pattern=_SAFE, description="ssh host or ~/.ssh/config alias")
    profile: str = Field(pattern=_SAFE_PATH, description="hardware profile name (profiles/*.yaml), or a profile "
                         "YAML file (one's own board; relative to the inventory file)")
    runner: str = Field(default="ssh", description="'ssh', or 'local' for this machine")
    user: str | None = Field(default=None, pattern=_SAFE)
    port: int | None = Field(default=None, ge=1, le=65535)
    workdir: str = Field(default="edgeopt", pattern=_SAFE_PATH, description="relative to the remote home")
    python: str = Field(default="python3", pattern=_SAFE_PATH, description="interpreter on the device")
    ssh_config: Path | None = Field(default=None, description="passed as ssh -F (default: ~/.ssh/config)")
    connect_timeout_s: int = Field(default=10, ge=1)
    timeout_s: float = Field(default=900, gt=0, description="limit for one remote command")
    retries: int = Field(default=2, ge=0, description="retries after a connection timeout or refusal")
    emulated: bool = Field(default=False, description="an emulated board (its latency is not device latency); "
                                                      "the agent also detects qemu-user itself")

    @field_validator("workdir", "python")
    @classmethod
    def _no_parent_hops(cls, value: str) -> str:
        if ".." in value.split("/"):
            raise ValueError("must not contain '..'")
        return value


class Inventory(BaseModel):
    model_config = ConfigDict(extra="forbid")

    devices: list[Device] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique_names(self) -> Inventory:
        names = [d.name for d in self.devices]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"device names must be unique; repeated: {', '.join(dupes)}")
        return self

    def get(self, name: str) -> Device:
        for device in self.devices:
            if device.name == name:
                return device
        raise unknown_name("device", name, [d.name for d in self.devices])


def default_inventory_path() -> Path:
    return Path(os.environ.get("EDGEOPT_INVENTORY", INVENTORY_PATH))


def load_inventory(path: Path | None = None) -> Inventory:
    """The inventory at `path` ($EDGEOPT_INVENTORY, else devices/inventory.yaml)."""
    path = Path(path) if path is not None else default_inventory_path()
    if not path.is_file():
        raise InputError(f"device inventory not found: {path} (copy devices/inventory.yaml and edit it)")
    inventory = load_model_yaml(path, Inventory)
    from edgeopt.profiles import is_profile_path

    for device in inventory.devices:  # ssh_config and profile files are relative to the inventory file
        if device.ssh_config is not None and not device.ssh_config.is_absolute():
            device.ssh_config = (path.parent / device.ssh_config).resolve()
        if is_profile_path(device.profile) and not Path(device.profile).expanduser().is_absolute():
            device.profile = str((path.parent / device.profile).resolve())
    return inventory
