"""Finding the images of an ImageNet-layout split without being fooled by symbolic links.

Links are followed (datasets are often assembled from links into other disks), but:

* a link to a folder that contains it (``ln -s .. up``, ``ln -s . self``) would make the walk
  loop; it is refused, naming the link;
* a folder or an image reached twice in a split (two links to one place, a link from one class
  folder into another) would count its images twice, possibly under two labels; it is refused,
  naming both paths. Every image must be reached exactly once.

Two different files with the same contents (copies, hard links) are not looked for.
"""
from __future__ import annotations

import os

from .errors import DataError

__all__ = ["SplitWalk"]

_FolderId = tuple[int, int]     # (st_dev, st_ino)


def _folder_id(path: str) -> _FolderId:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def _ancestor_ids(path: str) -> set[_FolderId]:
    """Ids of ``path`` and of every folder above it (after resolving links)."""
    ids, current = set(), os.path.realpath(path)
    while True:
        ids.add(_folder_id(current))
        parent = os.path.dirname(current)
        if parent == current:
            return ids
        current = parent


class SplitWalk:
    """Collects the image files of the class folders of one split, each reached exactly once.

    Call :meth:`images` for every class folder, then :meth:`check_linked_files`; both raise
    DataError naming the offending link.
    """

    def __init__(self, extensions: tuple[str, ...]) -> None:
        self.extensions = extensions
        self._folders: dict[_FolderId, tuple[str, str]] = {}    # id -> (first path reaching it, its class folder)
        self._linked_files: dict[str, str] = {}                 # real path -> the link reaching it
        self._class_dir = ""

    def images(self, class_dir: str) -> list[str]:
        """Image paths under ``class_dir`` (links followed), in sorted folder then file order."""
        self._class_dir = class_dir
        found: list[tuple[str, list[str]]] = []
        stack = [(class_dir, _ancestor_ids(os.path.dirname(os.path.abspath(class_dir))))]
        while stack:
            folder, ancestors = stack.pop()
            own_id = self._enter(folder, ancestors)
            names, subfolders = self._scan(folder)
            found.append((folder, names))
            stack += [(sub, ancestors | {own_id}) for sub in subfolders]
        return [os.path.join(folder, name) for folder, names in sorted(found) for name in names]

    def check_linked_files(self) -> None:
        """Refuse a linked image whose target the walk also reached directly."""
        for target, link in self._linked_files.items():
            if not os.path.basename(target).lower().endswith(self.extensions):
                continue
            seen = self._folders.get(_folder_id(os.path.dirname(target)))
            if seen is not None:
                direct = os.path.join(seen[0], os.path.basename(target))
                raise DataError(f"image {direct} is also reached as {link} (a symbolic link to it)"
                                f"{_labels(seen[1], self._class_of_link(link))}; every image must be reached once: "
                                "remove the link")

    def _class_of_link(self, link: str) -> str:
        return next((cls for _, cls in self._folders.values() if link.startswith(cls + os.sep)), "")

    def _enter(self, folder: str, ancestors: set[_FolderId]) -> _FolderId:
        own_id = _folder_id(folder)
        if own_id in ancestors:
            raise DataError(f"symbolic link {folder} points to {os.path.realpath(folder)}, a folder that contains "
                            "it: following it would loop forever, counting the same images again and again; "
                            "remove the link")
        if own_id in self._folders:
            first, first_class = self._folders[own_id]
            raise DataError(f"folder {os.path.realpath(folder)} is reached twice, as {first} and as {folder} "
                            f"(through a symbolic link){_labels(first_class, self._class_dir)}: its images would "
                            "be counted twice; remove one of the links")
        self._folders[own_id] = (folder, self._class_dir)
        return own_id

    def _scan(self, folder: str) -> tuple[list[str], list[str]]:
        names, subfolders = [], []
        try:
            with os.scandir(folder) as entries:
                for entry in entries:
                    if entry.is_dir():                                  # follows links
                        subfolders.append(entry.path)
                    elif entry.name.lower().endswith(self.extensions):
                        if entry.is_symlink():
                            self._add_linked_file(entry.path)
                        names.append(entry.name)
        except OSError as err:
            raise DataError(f"cannot list the images in {folder}: {err.strerror or err}; "
                            "check that the folder is readable") from None
        return sorted(names), subfolders

    def _add_linked_file(self, link: str) -> None:
        target = os.path.realpath(link)
        if not os.path.isfile(target):
            raise DataError(f"image {link} is a symbolic link to {target}, which does not exist; "
                            "fix or remove the link")
        if target in self._linked_files:
            raise DataError(f"image {target} is reached twice, as {self._linked_files[target]} and as {link} "
                            "(symbolic links); every image must be reached once: remove one of the links")
        self._linked_files[target] = link


def _labels(first_class: str, second_class: str) -> str:
    if not first_class or not second_class or first_class == second_class:
        return ""
    return (f" under two labels ({os.path.basename(first_class)} and {os.path.basename(second_class)})")
