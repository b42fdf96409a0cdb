"Site settings and the messages that point at them."
import json, re
from pathlib import Path

import pytest

from sara.config import SITE_DEFAULTS, site_settings
from sara.data import read_manifest

ROOT = Path(__file__).resolve().parents[1]


def test_every_settings_key_a_message_recommends_exists():
    "A message that says 'settings key `k`' must name a key that settings.ini accepts."
    named = {k for f in (ROOT / "sara").glob("*.py") for k in re.findall(r"settings key `(\w+)`", f.read_text())}
    assert named <= set(SITE_DEFAULTS), sorted(named - set(SITE_DEFAULTS))


def test_no_entities_message_recommends_what_exists(tmp_path):
    (tmp_path / "a.mp4").write_bytes(b"")
    m = tmp_path / "m.jsonl"
    m.write_text(json.dumps(dict(video="a.mp4", caption="a red fox")) + "\n")
    with pytest.raises(ValueError, match="field 'entities' is missing") as e:
        read_manifest(m)
    msg = str(e.value)
    assert "extractor=EntityExtractor(" in msg
    for key in re.findall(r"settings key `(\w+)`", msg):                 # any key it names is accepted by settings.ini
        (tmp_path / "settings.ini").write_text(f"[sara]\n{key} = x\n")
        site_settings(tmp_path, env={})


def test_shipped_settings_ini_is_accepted():
    s = site_settings(ROOT, env={})
    assert set(SITE_DEFAULTS) <= set(s) and Path(s["data_root"]).is_dir()
