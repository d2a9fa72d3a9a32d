"""tools/debian_corpus.py's text extraction (the apt download itself needs a network: not in CI)."""
import gzip

from tools.debian_corpus import document, html_to_text, pod_to_text


def test_html_keeps_prose_and_drops_chrome():
    page = """<html><head><title>T</title><style>p {color: red}</style></head><body>
    <div class="sphinxsidebar"><h3>Navigation</h3><div><a href="x">index</a></div></div>
    <nav>Previous | Next</nav><h1>Heading</h1><p>First   paragraph
    spans lines &amp; entities.</p><pre>  code  keeps
    its spaces</pre><script>var x = 1;</script><p>Last.<br>Line two.</p></body></html>"""
    text = html_to_text(page)
    assert text.splitlines()[0] == "Heading"
    assert "First paragraph spans lines & entities." in text
    assert "  code  keeps\n    its spaces" in text
    assert "Last.\nLine two." in text
    for chrome in ("Navigation", "index", "Previous", "color", "var x", "T\n"):
        assert chrome not in text, chrome


def test_pod_markup_is_stripped():
    pod = "=head1 NAME\n\nperlfoo - B<bold> and C<code> and L<perlfunc/open>\n\n=over 4\n\n=item * one\n\n=cut\n"
    assert pod_to_text(pod) == "NAME\n\nperlfoo - bold and code and perlfunc/open\n\n* one"


def test_documents_by_suffix_gzip_and_encoding(tmp_path):
    (tmp_path / "a.rst").write_text("Title\n=====\n\n\n\nBody   \n")
    with gzip.open(tmp_path / "b.txt.gz", "wt") as f:
        f.write("zipped text")
    (tmp_path / "c.png").write_bytes(b"\x89PNG")
    (tmp_path / "d.txt").write_bytes(b"\xff\xfe not utf-8")
    assert document(str(tmp_path / "a.rst")) == "Title\n=====\n\nBody"
    assert document(str(tmp_path / "b.txt.gz")) == "zipped text"
    assert document(str(tmp_path / "c.png")) is None and document(str(tmp_path / "d.txt")) is None
