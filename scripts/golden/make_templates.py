"""Golden renders of real chat templates, for burnish-data's template and loss-mask tests.

Copies the chat templates shipped in the `trl` wheel (`trl/chat_templates/*.jinja`, the model
repositories' own templates plus `*_training.jinja` variants with `{% generation %}` markers)
into tests/fixtures/data/templates/, renders each of them with transformers'
`apply_chat_template` on every conversation of tests/fixtures/data/templates/conversations.json,
with and without the generation prompt, and writes tests/fixtures/data/templates/golden.json:

- `texts`: every distinct rendered text, once;
- `renders`: one entry per template x conversation x add_generation_prompt, holding either `text`,
  an index into `texts`, or the `error` the template raised;
- `masks`: for templates with generation markers, `input_ids` (space-separated) and
  `assistant_masks` (a string of 0/1, one per token) from `apply_chat_template(..., tokenize=True, return_dict=True,
  return_assistant_tokens_mask=True)`, tokenized with the fixture tokenizer of
  tests/fixtures/models/llama (byte-level BPE, ChatML special tokens).

Every render gets `date_string` as a template variable, and templates that ask for today's date
with `strftime_now` get RENDER_TIME (recorded in the golden as `render_epoch`, which the tests pass
to burnish as SOURCE_DATE_EPOCH), so the goldens are the same whatever day they are made or
checked. Run from the repository root; nothing is downloaded.
"""

import datetime
import json
import shutil
from pathlib import Path

import jinja2
import transformers
import trl
from transformers import PreTrainedTokenizerFast

OUT = Path("tests/fixtures/data/templates")
TOKENIZER = Path("tests/fixtures/models/llama/tokenizer.json")
DATE_STRING = "26 Jul 2024"
RENDER_TIME = datetime.datetime(2026, 11, 26, tzinfo=datetime.timezone.utc)


class PinnedClock(datetime.datetime):
    """`datetime` whose `now()` is RENDER_TIME: what transformers' `strftime_now` reads."""

    @classmethod
    def now(cls, tz=None):
        return RENDER_TIME if tz is None else RENDER_TIME.astimezone(tz)
SPECIAL = {"bos_token": "<|endoftext|>", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}


def main():
    transformers.utils.chat_template_utils.datetime = PinnedClock
    source_dir = Path(trl.__file__).parent / "chat_templates"
    conversations = json.loads((OUT / "conversations.json").read_text())
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(TOKENIZER), **SPECIAL)

    renders, masks, names, texts = [], [], [], {}
    for path in sorted(source_dir.glob("*.jinja")):
        name = path.stem
        names.append(name)
        shutil.copyfile(path, OUT / path.name)
        template = path.read_text()
        tokenizer.chat_template = template
        for conv in conversations:
            for agp in (False, True):
                entry = {"template": name, "conversation": conv["name"], "add_generation_prompt": agp}
                try:
                    text = tokenizer.apply_chat_template(
                        conv["messages"], tokenize=False, add_generation_prompt=agp, date_string=DATE_STRING
                    )
                    entry["text"] = texts.setdefault(text, len(texts))
                except Exception as e:  # the template raised: record its message
                    entry["error"] = f"{type(e).__name__}: {e}"
                renders.append(entry)
            if "generation" in template and "endgeneration" in template:
                try:
                    out = tokenizer.apply_chat_template(
                        conv["messages"],
                        tokenize=True,
                        return_dict=True,
                        return_assistant_tokens_mask=True,
                        date_string=DATE_STRING,
                    )
                except Exception:
                    continue
                masks.append(
                    {
                        "template": name,
                        "conversation": conv["name"],
                        "input_ids": " ".join(str(i) for i in out["input_ids"]),
                        "assistant_masks": "".join(str(m) for m in out["assistant_masks"]),
                    }
                )

    golden = {
        "versions": {"transformers": transformers.__version__, "trl": trl.__version__, "jinja2": jinja2.__version__},
        "special_tokens": SPECIAL,
        "date_string": DATE_STRING,
        "render_epoch": int(RENDER_TIME.timestamp()),
        "templates": names,
        "texts": list(texts),
        "renders": renders,
        "masks": masks,
    }
    (OUT / "golden.json").write_text(json.dumps(golden, ensure_ascii=False, indent=0, separators=(",", ":")) + "\n")
    ok = sum("text" in r for r in renders)
    print(f"{len(names)} templates, {len(conversations)} conversations: {ok} renders, "
          f"{len(renders) - ok} raised; {len(masks)} token/mask goldens")


if __name__ == "__main__":
    main()
