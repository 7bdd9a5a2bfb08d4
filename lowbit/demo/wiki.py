"""Plain English text from a MediaWiki XML dump: main-namespace articles with markup, citations, tables and
link lists stripped (mwparserfromhell), one line per paragraph, heading or list item."""

from __future__ import annotations

import re


def iter_articles(stream):
    """Yield (title, wikitext) of main-namespace, non-redirect pages, streaming so memory stays small."""
    import xml.etree.ElementTree as ET

    for _, elem in ET.iterparse(stream, events=("end",)):
        ns, _, tag = elem.tag.rpartition("}")
        if tag != "page":
            continue
        q = ns + "}" if ns else ""  # the export schema's namespace, e.g. {http://www.mediawiki.org/xml/export-0.10/}
        if elem.findtext(f"{q}ns") == "0" and elem.find(f"{q}redirect") is None:
            title = (elem.findtext(f"{q}title") or "").strip()
            wikitext = elem.findtext(f"{q}revision/{q}text") or ""
            if title and wikitext:
                yield title, wikitext
        elem.clear()


# Tags whose content is not prose: citations, formulas, tables, galleries, code.
_DROP_TAGS = {"ref", "references", "gallery", "math", "table", "timeline", "source", "syntaxhighlight",
              "score", "imagemap", "chem", "ce", "hiero", "graph", "templatedata", "mapframe", "maplink"}
_DROP_LINK_NAMESPACES = {"file", "image", "media", "category"}
_INTERWIKI = {"wikt", "wiktionary", "s", "wikisource", "w", "wikipedia", "q", "wikiquote", "b", "wikibooks",
              "n", "wikinews", "v", "wikiversity", "voy", "commons", "species", "d", "wikidata"}
# Sections that are lists of links and citations rather than prose.
_SKIP_SECTIONS = {"see also", "references", "external links", "further reading", "notes", "bibliography",
                  "sources", "citations", "footnotes", "notes and references", "references and notes",
                  "works cited", "gallery", "other uses"}
_HEADING = "\x01"  # marks heading lines between strip_code and line cleaning (levels 1-6: one digit)
_MARKUP = re.compile(r"\[\[|\]\]|\{\{|\}\}|\{\||\|\}|\||<ref|</ref|<[a-z]+[ />]|&[a-z]+;|&#\d+;|__[A-Z]+__")
_EMPTY_PARENS = re.compile(r" ?\((?:\s|[,;])*\)")
_REF_RESIDUE = re.compile(r"<ref[^>]*/>|<ref[^>]*>.*?</ref>", re.S)


def article_text(title: str, wikitext: str) -> str | None:
    """Plain text of one article (title line first), or None when nothing readable is left."""
    lines = _clean_lines(_strip_markup(wikitext))
    return "\n".join([title] + lines) if lines else None


def _strip_markup(wikitext: str) -> str:
    import mwparserfromhell

    code = mwparserfromhell.parse(wikitext)
    for tag in code.filter_tags():
        name = str(tag.tag).strip().lower()
        if name in _DROP_TAGS:
            _remove(code, tag)
        elif name == "br":
            _replace(code, tag, " ")  # else strip_code glues the words on either side together
    for link in code.filter_wikilinks():
        _rewrite_link(code, link)
    for heading in code.filter_headings():
        title = heading.title.strip_code().strip()
        _replace(code, heading, f"\n{_HEADING}{heading.level}{title}\n")
    return code.strip_code()


def _rewrite_link(code, link) -> None:
    target = str(link.title).strip()
    prefix, colon, rest = target.partition(":")
    prefix = prefix.strip()
    if not colon or target.startswith(":"):
        return  # an ordinary article link: strip_code keeps its text
    if prefix.lower() in _DROP_LINK_NAMESPACES:
        _remove(code, link)  # images (with their captions) and category tags are not prose
    elif link.text is None and prefix.lower() in _INTERWIKI:
        _replace(code, link, rest)  # strip_code would keep the "wikt:" prefix
    elif link.text is None and re.fullmatch(r"[a-z]{2,3}(-[a-z]+)*", prefix):
        _remove(code, link)  # interlanguage links ("de:Anarchismus") are not part of the article


def _remove(code, node) -> None:
    try:
        code.remove(node)
    except ValueError:
        pass  # it sat inside a node that has already been removed


def _replace(code, node, value) -> None:
    try:
        code.replace(node, value)
    except ValueError:
        pass


def _clean_lines(text: str) -> list[str]:
    """Keep prose, headings that have prose under them and list items; drop what markup left behind."""
    lines = []
    skip_below = None  # heading level of a skipped section (See also, References, ...)
    for line in text.replace("\xa0", " ").split("\n"):
        line = re.sub(r"\s+", " ", _REF_RESIDUE.sub("", line)).strip()
        if line.startswith(_HEADING):
            level, title = int(line[1]), line[2:].strip()
            if skip_below is not None and level > skip_below:
                continue
            skip_below = level if title.lower() in _SKIP_SECTIONS else None
            if skip_below is None and title:
                lines.append(line[:2] + title)
        elif skip_below is None and _is_prose(line):
            lines.append(_tidy(line))
    return _drop_empty_sections(lines)


def _tidy(line: str) -> str:
    """Close gaps that removed templates (pronunciations, conversions) leave: "Alabama () is", "Greek , i.e."."""
    line = _EMPTY_PARENS.sub("", line)
    line = re.sub(r"\(\s*(?:[,;]\s*)+", "(", line)
    line = re.sub(r"(?:\s*[,;])+\s*\)", ")", line)
    line = re.sub(r" +([,;])", r"\1", line)
    # Bold/italic quotes the parser could not pair ("Iliad'''s"): keep a possessive apostrophe, drop the rest.
    return re.sub(r"'{2,}", "", re.sub(r"'{2,}(?=s\b)", "'", line))


def _is_prose(line: str) -> bool:
    if sum(c.isalpha() for c in line) < 3:
        return False  # empty, punctuation, numbers, or single letters left from tables
    if line[0] in "|!{}" or _MARKUP.search(line):
        return False  # table rows, template leftovers and broken markup: drop the line, not just the token
    if line.startswith("(") and line.endswith(")"):
        return False  # parenthesised fragments ("(UK)") left over from tables and infoboxes
    return not re.match(r"(?i)(category|file|image)\s*:", line)


def _drop_empty_sections(lines: list[str]) -> list[str]:
    """Drop heading lines with no prose before the next heading of the same or a higher level."""
    kept = []
    for i, line in enumerate(lines):
        if not line.startswith(_HEADING):
            kept.append(line)
            continue
        level = int(line[1])
        for after in lines[i + 1:]:
            if not after.startswith(_HEADING):
                kept.append(line[2:])
                break
            if int(after[1]) <= level:
                break
    return kept
