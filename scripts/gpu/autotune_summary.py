"""Summarises cubecl's autotune cache (the `tuned` build's choices, kept under
target/autotune/<version>/<device>/*.json.log): for every tuned matrix product and reduction, its
shape, the fastest kernel, and how much slower the others that ran were (the five next). Without
autotuning burn takes one fixed kernel per operation; these lines say which one to pin instead,
shape by shape. Usage: autotune_summary.py CACHE_DIR"""
import json
import pathlib
import sys


def seconds(duration):
    return duration["secs"] + duration["nanos"] * 1e-9


def describe(key):
    """The readable part of a tune key: a product's m, n, k, types and layouts, or a reduction's
    row length and count."""
    inner = key.get("key", key)
    definition = inner.get("definition")
    if definition:
        types = "/".join(
            str(next(iter(definition[side]["Scalar"].values())))
            for side in ("elem_lhs", "elem_rhs", "elem_out")
        )
        layouts = " ".join(
            json.dumps(definition[side]).replace('"', "")
            for side in ("matrix_layout_lhs", "matrix_layout_rhs")
        )
        return f"m {definition['m']} n {definition['n']} k {definition['k']} {types} {layouts}"
    return " ".join(f"{name} {value}" for name, value in inner.items() if name != "checksum")


def main(cache):
    files = sorted(pathlib.Path(cache).rglob("*.json.log"))
    if not files:
        print(f"no autotune cache under {cache}")
        return
    for path in files:
        print(f"== {path.parent.name}/{path.name}")
        for line in path.read_text().splitlines():
            entry = json.loads(line)
            ran = [
                (seconds(outcome["Ok"]["computation"]["median"]), outcome["Ok"]["name"])
                for outcome in (result["outcome"] for result in entry["value"]["results"])
                if "Ok" in outcome
            ]
            if not ran:
                continue
            ran.sort()
            best, name = ran[0]
            others = ", ".join(f"{other} {t / best:.2f}x" for t, other in ran[1:6])
            print(f"{describe(entry['key'])}: {name} {best * 1e3:.3f} ms; {others}")


if __name__ == "__main__":
    main(sys.argv[1])
