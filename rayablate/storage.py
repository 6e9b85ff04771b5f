"""Cloud storage for outputs and Ray Train checkpoints: s3:// and gs:// URIs through pyarrow.fs.

An S3-compatible server other than AWS (MinIO, Ceph, a local test server) is named the way the AWS
SDKs name it: `AWS_ENDPOINT_URL_S3` or `AWS_ENDPOINT_URL` (e.g. `http://127.0.0.1:9000`).
Credentials come from the usual chain (environment, ~/.aws, the instance's role); for gs:// from
Google's application-default credentials.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from urllib.parse import urlparse

REMOTE_SCHEMES = ("s3", "gs", "gcs")


def is_remote(uri: str | os.PathLike) -> bool:
    """True for s3://, gs:// (gcs://) URIs; False for local paths and file:// URIs."""
    return urlparse(str(uri)).scheme in REMOTE_SCHEMES


def s3_endpoint() -> str | None:
    """The S3 endpoint URL from the environment, or None for AWS itself."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def _s3_with_endpoint(endpoint: str):
    import pyarrow.fs as pafs

    ep = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    kwargs = {"region": region} if region else {}
    return pafs.S3FileSystem(endpoint_override=ep.netloc, scheme=ep.scheme, **kwargs)


def filesystem(uri: str):
    """(pyarrow filesystem, path on it) of a URI or a local folder."""
    import pyarrow.fs as pafs

    uri = str(uri)
    parsed = urlparse(uri)
    if parsed.scheme == "s3" and s3_endpoint():
        return _s3_with_endpoint(s3_endpoint()), (parsed.netloc + parsed.path).rstrip("/")
    if not parsed.scheme or parsed.scheme == "file":
        return pafs.LocalFileSystem(), str(Path(uri.removeprefix("file://")).expanduser().resolve())
    return pafs.FileSystem.from_uri(uri)


def train_storage(uri: str):
    """(storage_path, storage_filesystem) for Ray Train's `RunConfig`.

    Ray resolves s3:// and gs:// URIs by itself, but not a custom S3 endpoint: then the path is given
    on an explicit `S3FileSystem`, which travels to every worker with the endpoint inside it.
    """
    if urlparse(uri).scheme == "s3" and s3_endpoint():
        return filesystem(uri)[1], _s3_with_endpoint(s3_endpoint())
    return uri, None


def check_remote_dir(uri: str) -> None:
    """Fail before any work when the bucket of `uri` does not exist or cannot be listed."""
    import pyarrow.fs as pafs

    fs, path = filesystem(uri)
    bucket = path.split("/", 1)[0]
    try:
        info = fs.get_file_info(bucket)
    except OSError as e:
        raise PermissionError(f"cannot access the output bucket of {uri}: {e}") from e
    if info.type != pafs.FileType.Directory:
        raise FileNotFoundError(f"output bucket does not exist: {urlparse(uri).scheme}://{bucket}")


def upload_dir(local_dir: str | os.PathLike, uri: str) -> list[str]:
    """Copy a local folder's files to `uri` (the folder's contents land directly under it).

    Returns the uploaded files' paths relative to the folder.
    """
    import pyarrow.fs as pafs

    local_dir = Path(local_dir)
    files = sorted(str(p.relative_to(local_dir)) for p in local_dir.rglob("*") if p.is_file())
    fs, path = filesystem(uri)
    fs.create_dir(path, recursive=True)
    pafs.copy_files(str(local_dir.resolve()), path, source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=fs)
    return files


def download_dir(uri: str, local_dir: str | os.PathLike) -> list[str]:
    """Copy everything under `uri` into a local folder. Returns the files' relative paths."""
    import pyarrow.fs as pafs

    fs, path = filesystem(uri)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    files = sorted(i.path[len(path):].lstrip("/") for i in infos if i.type == pafs.FileType.File)
    if not files:
        raise FileNotFoundError(f"nothing stored under {uri}")
    Path(local_dir).mkdir(parents=True, exist_ok=True)
    pafs.copy_files(path, str(Path(local_dir).resolve()), source_filesystem=fs,
                    destination_filesystem=pafs.LocalFileSystem())
    return files


def main(argv=None) -> int:
    """`python -m rayablate.storage fetch URI DIR` downloads a run's outputs (report.md, metrics.json,
    ...); `python -m rayablate.storage upload DIR URI` uploads a local output folder."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m rayablate.storage", description=main.__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    fetch = sub.add_parser("fetch", help="download everything under an s3:// or gs:// URI into DIR")
    fetch.add_argument("uri")
    fetch.add_argument("dir")
    up = sub.add_parser("upload", help="copy the files of DIR to an s3:// or gs:// URI")
    up.add_argument("dir")
    up.add_argument("uri")
    args = ap.parse_args(argv)
    if args.cmd == "fetch":
        files = download_dir(args.uri, args.dir)
        print(f"{len(files)} files from {args.uri} in {args.dir}")
    else:
        if not Path(args.dir).is_dir():
            print(f"error: not a folder: {args.dir}", file=sys.stderr)
            return 2
        files = upload_dir(args.dir, args.uri)
        print(f"{len(files)} files from {args.dir} to {args.uri}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
