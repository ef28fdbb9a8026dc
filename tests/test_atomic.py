"""Atomic outputs: complete files appear whole, failures leave nothing."""

from __future__ import annotations

import os
import stat

import pytest

from stevs.atomic import atomic_path, atomic_write_text


def test_complete_write_renames_with_normal_permissions(tmp_path):
    out = atomic_write_text(tmp_path / "sub" / "a.txt", "hello")
    assert out.read_text() == "hello"
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~umask
    assert sorted(p.name for p in out.parent.iterdir()) == ["a.txt"]


def test_failure_leaves_neither_output_nor_temporary(tmp_path):
    target = tmp_path / "b.h5ad"
    with pytest.raises(RuntimeError), atomic_path(target, suffix=".h5ad") as tmp:
        assert tmp.suffix == ".h5ad" and tmp.parent == tmp_path
        tmp.write_text("half written")
        raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_existing_output_is_replaced_only_on_success(tmp_path):
    target = atomic_write_text(tmp_path / "c.tsv", "old")
    with pytest.raises(ValueError), atomic_path(target) as tmp:
        tmp.write_text("new")
        raise ValueError
    assert target.read_text() == "old"
