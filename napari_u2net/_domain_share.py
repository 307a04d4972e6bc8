"""The domain selector's sharing buttons: a domain's model card, and Export…/Import… of ``.u2d`` files.

The work (verifying, writing, installing) is the core's :mod:`training.model.domain_file`; it runs in
a worker (:func:`._jobs.start`), errors become the selector's notifications
(:func:`._jobs.user_message`), and an imported domain appears in the list, ticked, as a fine-tuned
one does. Tests call :meth:`DomainShare.export_to` / :meth:`DomainShare.import_from` with a path (what
the file dialogs call).
"""

from __future__ import annotations

import logging
from pathlib import Path

from qtpy.QtCore import Qt
from qtpy.QtWidgets import QDialog, QDialogButtonBox, QFileDialog, QInputDialog, QPlainTextEdit, QVBoxLayout

from training.errors import InputError
from training.model.card import card_from_meta
from training.model.domain_file import SUFFIX

from . import _jobs

log = logging.getLogger(__name__)
FILE_FILTER = f"U²-Net domain (*{SUFFIX})"


def card_dialog(parent, title: str, text: str) -> QDialog:
    """A read-only, selectable text dialog (the card), sized for a 1366×768 screen."""
    dialog = QDialog(parent)
    dialog.setWindowTitle(title)
    layout = QVBoxLayout(dialog)
    view = QPlainTextEdit(text)
    view.setReadOnly(True)
    view.setLineWrapMode(QPlainTextEdit.WidgetWidth)
    layout.addWidget(view)
    buttons = QDialogButtonBox(QDialogButtonBox.Close)
    buttons.rejected.connect(dialog.reject)
    layout.addWidget(buttons)
    dialog.resize(560, 360)
    dialog.text_view = view
    return dialog


def import_job(path: Path, model_dir: Path, new_name: str | None, overwrite: bool):
    from training.model.domain_file import import_domain

    from ._warmup import TORCH_LOCK

    with TORCH_LOCK:
        return import_domain(path, model_dir, overwrite=overwrite, new_name=new_name)


def export_job(model_dir: Path, domain: str, path: Path):
    from training.model.domain_file import export_domain

    from ._warmup import TORCH_LOCK

    with TORCH_LOCK:
        return export_domain(model_dir, domain, path, overwrite=True)  # the save dialog asked already


class DomainShare:
    """Wires the Card…/Export…/Import… buttons of a :class:`~._widget.DomainSelectorWidget`."""

    def __init__(self, widget) -> None:
        self.widget = widget
        self.jobs = 0  # exports/imports running (tests wait for 0)
        self.dialog: QDialog | None = None  # the card dialog last opened
        g = widget.gui
        g.card_button.clicked.connect(lambda: self.show_card())
        g.export_button.clicked.connect(self.export_dialog)
        g.import_button.clicked.connect(self.import_dialog)

    # -- which domain ---------------------------------------------------------------------------
    def chosen_domain(self) -> str:
        """The one ticked domain, else the one last clicked; InputError saying what to do."""
        w = self.widget
        if w.model is None:
            raise InputError("no model is loaded yet: wait for it to load")
        ticked = w.checked_domains()
        if len(ticked) == 1:
            return ticked[0]
        item = w.gui.domain_list.currentItem()
        if item is not None and not ticked:
            return item.data(Qt.UserRole)
        raise InputError("tick the one domain to show or export" + (" (several are ticked)" if ticked else ""))

    @staticmethod
    def tooltip(meta) -> str:
        """A domain item's tooltip: its card, so hovering tells what it is and what not to use it for
        (rich text, which Qt wraps to a readable width; plain text would make one line per fact)."""
        import html

        return "<qt>" + html.escape(card_from_meta(meta).text()).replace("\n", "<br>") + "</qt>"

    def _refuse(self, action: str, error: BaseException) -> None:
        level, text = _jobs.user_message(error, action, "close other programs and try again")
        self.widget.gui.status_label.setText(f"{action.capitalize()} failed: {text}")
        self.widget._notify(level, text)

    # -- card -------------------------------------------------------------------------------------
    def show_card(self, domain: str | None = None) -> QDialog | None:
        try:
            domain = domain or self.chosen_domain()
        except InputError as e:
            self._refuse("showing the card", e)
            return None
        meta = self.widget.model.meta(domain)
        self.dialog = card_dialog(self.widget, f"Model card: {domain}", card_from_meta(meta).text())
        self.dialog.show()
        return self.dialog

    # -- export -----------------------------------------------------------------------------------
    def export_dialog(self) -> None:
        try:
            domain = self.chosen_domain()
        except InputError as e:
            self._refuse("exporting a domain", e)
            return
        path, _ = QFileDialog.getSaveFileName(self.widget, f"Export domain {domain}", f"{domain}{SUFFIX}", FILE_FILTER)
        if path:
            path = Path(path)
            self.export_to(path if path.suffix == SUFFIX else path.with_name(path.name + SUFFIX), domain)

    def export_to(self, path: Path, domain: str | None = None) -> None:
        """Write ``domain`` (default: the ticked one) of the current model to ``path`` in a worker."""
        w = self.widget
        try:
            domain = domain or self.chosen_domain()
        except InputError as e:
            self._refuse("exporting a domain", e)
            return
        self._start(export_job, w.model_dir, domain, Path(path), action="exporting a domain",
                    on_done=lambda shared: self._exported(shared))

    def _exported(self, shared) -> None:
        text = f"Exported {shared.domain!r} to {shared.path} ({shared.path.stat().st_size // 1024} KB)"
        self.widget.gui.status_label.setText(text)
        self.widget._notify("info", text)

    # -- import -----------------------------------------------------------------------------------
    def import_dialog(self) -> None:
        w = self.widget
        if w.model is None or w.model_dir is None:
            self._refuse("importing a domain", InputError("no model is loaded yet: wait for it to load"))
            return
        path, _ = QFileDialog.getOpenFileName(w, "Import a domain", "", FILE_FILTER)
        if not path:
            return
        name = self._name_in(Path(path))
        new_name = None
        if name is not None and name in w.model.adapters:
            new_name, ok = QInputDialog.getText(
                w, "Domain name taken",
                f"This model already has a domain {name!r}.\nImport the new one as (the same name replaces it):",
                text=f"{name}-2")
            if not ok or not new_name.strip():
                return
            new_name = new_name.strip()
        self.import_from(Path(path), new_name=new_name, overwrite=new_name == name)

    @staticmethod
    def _name_in(path: Path) -> str | None:
        """The domain a file says it holds (header only, unverified: import verifies it)."""
        from training.model.layout import HEADER_ERRORS, read_header_meta

        try:
            return str(read_header_meta(path).get("domain"))
        except HEADER_ERRORS:
            return None  # import says what is wrong with it

    def import_from(self, path: Path, new_name: str | None = None, overwrite: bool = False) -> None:
        """Verify and install the domain of ``path`` into the current model (the user's own model
        when it is the read-only bundled one) in a worker; then list it, ticked."""
        w = self.widget
        if w.model_dir is None:
            self._refuse("importing a domain", InputError("no model is loaded yet: wait for it to load"))
            return
        self._start(import_job, Path(path), w.model_dir, new_name, overwrite, action="importing a domain",
                    on_done=self._imported)

    def _imported(self, done) -> None:
        w = self.widget
        text = f"Imported {done.domain!r} into {done.model_dir.name!r}" + (f": {done.note}" if done.note else "")
        w.gui.status_label.setText(text)
        w._notify("info", text)
        w._on_domain_added(done.model_dir, done.domain)  # reload (or switch to the user's model), ticked

    # -- jobs -------------------------------------------------------------------------------------
    def _start(self, job, *args, action: str, on_done) -> None:
        def finished() -> None:
            self.jobs -= 1
            if self.widget.worker is None:  # a segmentation started meanwhile keeps them locked
                for b in self.widget.gui.share_buttons:
                    b.setEnabled(True)

        self.jobs += 1
        for b in self.widget.gui.share_buttons:
            b.setEnabled(False)
        self.widget.gui.status_label.setText(f"{action.capitalize()}…")
        _jobs.start(job, *args, on_done=on_done, on_error=lambda e: self._refuse(action, e),
                    on_finished=finished, owner=self.widget)
