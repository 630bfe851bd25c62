"""The TOML config: the documented keys work, and every mistake is named with key and line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from router.config import ConfigError, embedded_default, load, parse, resolve_secret

DOCUMENTED = """
[node]
ae_title = "DEID_ROUTER"
bind = "127.0.0.1"
port = 11112
spool_dir = "/var/lib/deid-router"

[[destinations]]
name = "research"
ae_title = "RESEARCH"
host = "127.0.0.1"
port = 4242

[deid]
secret = "a-site-secret"        # or secret_file = "path"
options = ["retain-longitudinal-modified-dates", "clean-pixel-data"]
"""


def test_the_documented_example_parses():
    config = parse(DOCUMENTED)
    assert config.node.ae_title == "DEID_ROUTER" and config.node.port == 11112
    assert config.node.spool_dir == Path("/var/lib/deid-router")
    assert config.destinations[0].name == "research" and config.destinations[0].port == 4242
    assert config.destinations[0].calling_ae_title == "DEID_ROUTER"
    assert config.deid.secret == b"a-site-secret"
    assert config.deid.options == {"retain-longitudinal-modified-dates", "clean-pixel-data"}


def test_every_mistake_is_reported_with_key_and_line():
    text = DOCUMENTED.replace('port = 4242', 'port = "4242"').replace(
        '"clean-pixel-data"]', '"clean-pixels"]\ncolour = "blue"').replace('bind = "127.0.0.1"', 'bind = "127.0.0.1"\nworkerz = 2')
    with pytest.raises(ConfigError) as error:
        parse(text, source=Path("router.toml"))
    problems = error.value.problems
    assert any("router.toml:5: node.workerz: unknown key" in p for p in problems), problems
    assert any(":13: destinations.0.port: must be int" in p for p in problems), problems
    assert any(":17: deid.options: unknown option 'clean-pixels'" in p for p in problems), problems
    assert any(":18: deid.colour: unknown key" in p for p in problems), problems
    assert len(problems) == 4


def test_associations_per_destination_are_bounded():
    for value, ok in ((1, True), (8, True), (0, False), (9, False)):
        text = DOCUMENTED.replace('port = 4242', f'port = 4242\nassociations = {value}', 1)
        if ok:
            assert parse(text).destinations[0].associations == value
        else:
            with pytest.raises(ConfigError, match="destinations.0.associations: must be 1 to 8"):
                parse(text)


def test_attempts_per_destination_are_at_least_one():
    assert parse(DOCUMENTED).destinations[0].refused_attempts == 3
    for key in ("max_attempts", "refused_attempts"):
        text = DOCUMENTED.replace('port = 4242', f'port = 4242\n{key} = 1', 1)
        assert getattr(parse(text).destinations[0], key) == 1
        with pytest.raises(ConfigError, match=f"destinations.0.{key}: must be 1 or more"):
            parse(DOCUMENTED.replace('port = 4242', f'port = 4242\n{key} = 0', 1))


def test_toml_syntax_error_names_the_line():
    with pytest.raises(ConfigError, match="line 2"):
        parse("[node]\nport = = 3\n")


def test_secret_file_and_overrides(tmp_path):
    (tmp_path / "secret").write_text("0123456789abcdef\n")
    (tmp_path / "router.toml").write_text(
        '[deid]\nsecret_file = "secret"\n[deid.overrides]\n"(0008,1030)" = "keep"\nInstitutionName = { action = "replace", value = "Site A" }\n'
        '[[deid.safe_private]]\ncreator = "ACME 1.1"\ngroup = 0x0009\nelement = 0x10\n')
    config = load(tmp_path / "router.toml")
    assert config.deid.secret == b"0123456789abcdef"
    assert config.deid.overrides[0x00081030].action == "keep"
    assert config.deid.overrides[0x00080080].value == "Site A"
    assert config.deid.safe_private[0].group == 9


def test_generated_secret_is_kept_and_private(tmp_path):
    config = embedded_default()
    from dataclasses import replace

    config = replace(config, node=replace(config.node, spool_dir=tmp_path / "spool"))
    first, generated = resolve_secret(config)
    again, generated_again = resolve_secret(config)
    assert generated and not generated_again and first == again and len(first) >= 32
    assert (tmp_path / "spool" / "site-secret").stat().st_mode & 0o077 == 0


def test_check_config_command(tmp_path):
    good, bad = tmp_path / "good.toml", tmp_path / "bad.toml"
    good.write_text(DOCUMENTED)
    bad.write_text(DOCUMENTED.replace("port = 11112", "port = 70000"))
    ok = subprocess.run([sys.executable, "-m", "router", "check-config", str(good)], capture_output=True, text=True)
    assert ok.returncode == 0 and "OK" in ok.stdout
    fail = subprocess.run([sys.executable, "-m", "router", "check-config", str(bad)], capture_output=True, text=True)
    assert fail.returncode == 2 and "bad.toml:5: node.port: must be 0..65535" in fail.stderr


def test_default_options_and_explicit_basic_profile():
    assert "retain-longitudinal-modified-dates" in parse("").deid.options
    assert parse("[deid]\noptions = []\n").deid.options == frozenset()


def test_name_finding_is_a_site_choice():
    assert parse("").deid.find_names and parse("").deid.not_names == ()
    deid = parse('[deid]\nfind_names = false\nnot_names = ["Dexter", "Sterling"]\n').deid
    assert deid.find_names is False and deid.not_names == ("Dexter", "Sterling")
    with pytest.raises(ConfigError) as error:
        parse('[deid]\nfind_names = "no"\nnot_names = "Dexter"\n')
    assert len(error.value.problems) == 2


def test_site_pixel_policy_is_layered_over_the_product_one(tmp_path):
    from router.profile import Deidentifier

    (tmp_path / "pixels.toml").write_text('mode = "phi"\n[select]\nskip_modalities = ["CT"]\n')
    (tmp_path / "router.toml").write_text('[deid]\nsecret = "0123456789"\npixel_policy = "pixels.toml"\n')
    config = load(tmp_path / "router.toml")
    cleaner = Deidentifier(config.deid, b"0123456789")._pixel_cleaner()
    assert cleaner.mode == "phi"
    assert cleaner.policy["select"]["skip_modalities"] == ["CT"]
    assert cleaner.policy["mask"]["margin"] >= 1  # untouched tables keep the product's values
    (tmp_path / "router.toml").write_text('[deid]\npixel_policy = "missing.toml"\n')
    with pytest.raises(ConfigError, match="deid.pixel_policy: cannot read"):
        load(tmp_path / "router.toml")


def test_reserved_destination_names():
    with pytest.raises(ConfigError, match="reserved"):
        parse('[[destinations]]\nname = "unrouted"\ntype = "folder"\npath = "x"\n')


def test_status_and_audit_sections_are_checked():
    from router.config import ConfigError, parse

    config = parse('[status]\nenabled = true\nport = 9100\n[audit]\npath = "audit.db"\ncrosswalk = true\n')
    assert config.status.enabled and config.status.port == 9100 and config.status.bind == "127.0.0.1"
    assert config.audit.crosswalk and config.audit.path.name == "audit.db"
    assert parse("").status.enabled is False and parse("").audit.path is None
    with pytest.raises(ConfigError) as error:
        parse('[node]\nport = 8080\n[status]\nenabled = true\nbind = "localhost"\n[audit]\ncrosswalk = true\n')
    text = str(error.value)
    assert "status.bind: must be an IP address" in text and "status.port: is the DICOM port" in text
    assert "audit.crosswalk: needs audit.path" in text
