"""The README documents every recipe key, from the schema itself, and names the two set-up commands."""

from __future__ import annotations

from pathlib import Path

from kdcli.recipe.reference import reference_markdown, reference_rows

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_recipe_reference_is_current() -> None:
    text = README.read_text(encoding="utf-8")
    start = text.index("<!-- recipe-reference:start -->\n") + len("<!-- recipe-reference:start -->\n")
    end = text.index("<!-- recipe-reference:end -->")
    assert text[start:end] == reference_markdown(), "run: kd recipe keys --markdown, and paste it into README.md"


def test_every_key_has_a_description() -> None:
    keys = [key for key, _, description in reference_rows() if not description]
    assert keys == [], f"undocumented recipe keys: {keys}"


def test_readme_names_the_two_commands() -> None:
    text = README.read_text(encoding="utf-8")
    assert "make quickstart" in text and "make test" in text


def test_readme_command_table_names_every_command() -> None:
    import typer

    from kdcli.cli import app

    text = README.read_text(encoding="utf-8")
    start = text.index("## Commands\n")
    table = text[start : text.index("\n## ", start + 1)]

    def names(command: typer.core.TyperGroup, prefix: str = "kd") -> list[str]:
        out = []
        for name, sub in command.commands.items():
            out += names(sub, f"{prefix} {name}") if hasattr(sub, "commands") else [f"{prefix} {name}"]
        return out

    missing = [name for name in names(typer.main.get_command(app)) if f"`{name}" not in table]
    assert missing == [], f"add to the README's command table: {missing}"
