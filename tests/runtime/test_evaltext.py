"""sparsedial.evaltext: HTML to text, split selection and hashing, and the error when python3-doc is missing.
None of these tests needs python3-doc: the documentation tree is a small fake written here."""

from __future__ import annotations

import hashlib

import pytest

from sparsedial import evaltext

PAGE = """<!DOCTYPE html>
<html><head><title>4. More Control Flow Tools</title><style>body { color: red }</style>
<script>var x = 1;</script></head>
<body>
<div class="related" role="navigation"><ul><li><a href="index.html">index</a></li></ul></div>
<div class="document"><div class="body" role="main">
  <section id="more-control-flow-tools">
  <h1>4. More Control Flow Tools<a class="headerlink" href="#x" title="Permalink">&para;</a></h1>
  <p>Besides the <a href="#while"><code class="docutils"><span class="pre">while</span></code></a>
     statement just   introduced, Python uses a few more &amp; more.</p>
  <div class="highlight-python3"><div class="highlight"><pre>&gt;&gt;&gt; x = int(input())
</pre></div></div>
  <ul><li><p>first item</p></li><li>second<br>line</li></ul>
  <div class="section"><p>Nested <em>div</em> text.</p></div>
  </section>
</div></div>
<div class="footer">&copy; Copyright 2001-2023, Python Software Foundation.</div>
</body></html>
"""

EXPECTED = """4. More Control Flow Tools

Besides the while statement just introduced, Python uses a few more & more.

first item

second

line

Nested div text.
"""


def test_html_to_text_keeps_the_main_body_as_paragraphs():
    assert evaltext.html_to_text(PAGE) == EXPECTED


def test_html_without_a_main_body_uses_the_whole_page():
    assert evaltext.html_to_text("<html><body><p>One  two</p><pre>code</pre><p>three</p></body></html>") \
        == "One two\n\nthree\n"
    assert evaltext.html_to_text("<html><body></body></html>") == ""


def test_split_hash_is_a_stable_function_of_paths_and_texts():
    files, texts = ("a/x.html", "b/y.html"), ("alpha\n", "beta\n")
    expected = hashlib.sha256(b"a/x.html\0alpha\n\0b/y.html\0beta\n\0").hexdigest()
    assert evaltext.split_sha256(files, texts) == expected
    assert evaltext.split_sha256(files[::-1], texts[::-1]) != expected
    assert evaltext.split_sha256(files, ("alpha\n", "beta!\n")) != expected


def _fake_doc_tree(root):
    for rel in ("tutorial/a.html", "tutorial/b.html", "howto/c.html", "faq/d.html", "library/e.html"):
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(f'<div role="main"><p>{rel} text</p></div>')
    return root


def test_prose_splits_are_disjoint_sorted_and_hashed(tmp_path):
    root = _fake_doc_tree(tmp_path)
    held = evaltext.load("prose", "heldout", root=root)
    cal = evaltext.load("prose", "calibration", root=root)
    assert held.files == ("howto/c.html", "tutorial/a.html", "tutorial/b.html")
    assert cal.files == ("faq/d.html",)  # library/ is in neither split
    assert held.texts[0] == "howto/c.html text\n"
    assert held.sha256 == evaltext.split_sha256(held.files, held.texts)
    assert held.sha256 == evaltext.load("prose", "heldout", root=root).sha256
    m = held.manifest()
    assert m["files"] == list(held.files) and m["chars"] == sum(map(len, held.texts)) and m["sha256"] == held.sha256


def test_code_splits_of_pip(tmp_path):
    for rel in ("_internal/req/r.py", "_internal/utils/u.py", "_vendor/v.py"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(f"# {rel}\n")
    assert evaltext.load("code", "heldout", root=tmp_path).files == ("_internal/req/r.py",)
    assert evaltext.load("code", "calibration", root=tmp_path).files == ("_internal/utils/u.py",)


def test_missing_python3_doc_is_one_clear_line(tmp_path):
    with pytest.raises(evaltext.EvalTextMissing) as e:
        evaltext.load("prose", "heldout", root=tmp_path / "nowhere")
    msg = str(e.value)
    assert "\n" not in msg and "python3-doc" in msg and "apt-get install" in msg


def test_bad_kind_or_split():
    with pytest.raises(ValueError):
        evaltext.load("poetry", "heldout")
    with pytest.raises(ValueError):
        evaltext.load("code", "train")
