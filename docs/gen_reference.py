"""Writes the generated reference pages at build time (mkdocs-gen-files): they cannot drift from the code."""

import mkdocs_gen_files

from emnist_cnn.cli.reference import format_cli_markdown, format_config_markdown

for path, text in (("reference/cli.md", format_cli_markdown()), ("reference/config.md", format_config_markdown())):
    with mkdocs_gen_files.open(path, "w") as f:
        f.write(text)
