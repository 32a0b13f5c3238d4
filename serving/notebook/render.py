"""The chat widget's HTML: answers rendered from Markdown (code highlighted, LaTeX left for MathJax), message
bubbles with a copy button, image figures that enlarge on a click, and the widget's style sheet.

Everything here is HTML for ipywidgets' HTML / HTMLMath widgets, which set it as the element's innerHTML:
model output is escaped (Markdown is rendered with raw HTML escaped), and the only script is the copy
button's inline click handler. HTMLMath typesets the math with JupyterLab's MathJax; the math is kept out of
the Markdown renderer so that its backslashes and underscores reach MathJax unchanged.
"""

from __future__ import annotations

import base64
import html
import io
import re

import mistune
from pygments import highlight
from pygments.formatters import HtmlFormatter
from pygments.lexers import get_lexer_by_name
from pygments.util import ClassNotFound

from serving.notebook.labels import text as label

# Code (fenced or inline) is matched first so that a $ inside code stays code; then display math ($$ $$, \[ \]),
# then inline math (\( \), and $x$ with no space just inside the dollars and no digit right after: not "$5 and $6").
_CODE_OR_MATH = re.compile(
    r"(?P<code>```.*?(?:```|\Z)|`[^`\n]+`)"
    r"|(?P<math>\$\$.+?\$\$|\\\[.+?\\\]|\\\(.+?\\\)|\$(?=\S)[^$\n]+?(?<=\S)\$(?!\d))",
    re.DOTALL)
_PLACEHOLDER = "qvmath{}qvend"
_PLACEHOLDER_RE = re.compile(r"qvmath(\d+)qvend")


class _Renderer(mistune.HTMLRenderer):
    def block_code(self, code: str, info=None) -> str:
        name = (info or "").strip().split(None, 1)[0] if info else ""
        try:
            lexer = get_lexer_by_name(name) if name else None
        except ClassNotFound:
            lexer = None
        if lexer is None:
            return f"<pre class='qv-code'><code>{html.escape(code)}</code></pre>\n"
        return highlight(code, lexer, HtmlFormatter(noclasses=True, style="friendly", cssclass="qv-code"))


_markdown = mistune.create_markdown(escape=True, renderer=_Renderer(escape=True),
                                    plugins=["strikethrough", "table", "url"])


def markdown_html(source: str) -> str:
    """An answer's Markdown as safe HTML: raw HTML escaped, code highlighted, math kept for MathJax."""
    maths: list = []

    def keep(match):
        if match.group("code"):
            return match.group("code")
        maths.append(match.group("math"))
        return _PLACEHOLDER.format(len(maths) - 1)

    rendered = _markdown(_CODE_OR_MATH.sub(keep, source or ""))
    return _PLACEHOLDER_RE.sub(lambda m: html.escape(maths[int(m.group(1))], quote=False), rendered)


# The copy button: the message's raw text sits in a hidden textarea beside it. The Clipboard API needs a
# secure context (https, localhost); elsewhere the textarea is selected and copied the old way.
_COPY_SCRIPT = (
    "const box=this.closest('.qv-msg').querySelector('textarea.qv-raw');"
    "const done=()=>{this.textContent=this.dataset.done;setTimeout(()=>{this.textContent=this.dataset.label},1500)};"
    "const old=()=>{box.style.display='block';box.select();document.execCommand('copy');box.style.display='none';done()};"
    "if(navigator.clipboard&&window.isSecureContext){navigator.clipboard.writeText(box.value).then(done,old)}else{old()}"
)


def bubble_html(text: str, role: str, lang: str = "en", *, markdown: bool = False, cursor: bool = False,
                note: str = "") -> str:
    """One message: who wrote it, a copy button, its text (Markdown for answers), an optional note."""
    who = {"user": "you", "assistant": "model", "system": "system"}.get(role)
    name = label(lang, who) if who else html.escape(role)
    body = (f"<div class='qv-md'>{markdown_html(text + (' ' + chr(0x258C) if cursor else ''))}</div>" if markdown
            else f"<div class='qv-plain'>{html.escape(text)}{chr(0x258C) if cursor else ''}</div>")
    copy = label(lang, "copy")
    button = (f"<button class='qv-copy' type='button' title='{html.escape(copy)}' data-label='{html.escape(copy)}' "
              f"data-done='{html.escape(label(lang, 'copied'))}' onclick=\"{html.escape(_COPY_SCRIPT)}\">"
              f"{html.escape(copy)}</button>")
    extra = f"<div class='qv-note'>{html.escape(note)}</div>" if note else ""
    return (f"<div class='qv-msg qv-msg-{html.escape(role)}'><div class='qv-who'><b>{name}</b>{button}</div>"
            f"{body}{extra}<textarea class='qv-raw' style='display:none' readonly>{html.escape(text)}</textarea></div>")


def png_data_url(image, max_side: int) -> str:
    """A PIL image shrunk to `max_side` (never enlarged) as a PNG data URL."""
    small = image.convert("RGB")
    small.thumbnail((max_side, max_side))
    buf = io.BytesIO()
    small.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def figure_html(thumbnail_url: str, caption: str, large_url: str) -> str:
    """A thumbnail with its caption that opens to a larger picture when clicked (and closes again)."""
    return (f"<details class='qv-figure'><summary><img class='qv-thumb' src='{thumbnail_url}' alt=''>"
            f"<div class='qv-caption'>{html.escape(caption)}</div></summary>"
            f"<img class='qv-large' src='{large_url}' alt='{html.escape(caption)}'></details>")


STYLE = """
.qv-chat .qv-scroll {border:1px solid #ddd; padding:6px;}
.qv-chat .qv-transcript, .qv-chat .qv-transcript > * {flex-shrink:0;}  /* rows keep their height: the box scrolls */
.qv-chat .qv-row .widget-html-content, .qv-chat .qv-row .widget-htmlmath-content {width:100%;}
.qv-chat .qv-msg {border-radius:6px; padding:4px 8px; margin:3px 0; word-break:break-word; line-height:1.45;}
.qv-chat .qv-msg-user {background:#e3f2fd;}
.qv-chat .qv-msg-assistant {background:#f5f5f5;}
.qv-chat .qv-msg-system {background:#fff8e1;}
.qv-chat .qv-who {display:flex; justify-content:space-between; align-items:center;}
.qv-chat .qv-copy {font-size:11px; padding:0 6px; border:1px solid #ccc; border-radius:4px; background:#fff;
                   cursor:pointer; color:#555;}
.qv-chat .qv-plain {white-space:pre-wrap;}
.qv-chat .qv-note {color:#777; font-size:90%; font-style:italic;}
.qv-chat .qv-md p {margin:2px 0;}
.qv-chat .qv-md pre, .qv-chat .qv-code {background:#f0f0f0; padding:6px; border-radius:4px; overflow:auto;}
.qv-chat .qv-md code {background:#ececec; padding:0 2px; border-radius:3px;}
.qv-chat .qv-md pre code {background:none; padding:0;}
.qv-chat .qv-md table {border-collapse:collapse; margin:4px 0;}
.qv-chat .qv-md th, .qv-chat .qv-md td {border:1px solid #ccc; padding:2px 6px;}
.qv-chat .qv-md ul, .qv-chat .qv-md ol {margin:2px 0; padding-left:22px;}
.qv-chat .qv-upload {font-size:0; width:40px;}
.qv-chat .qv-upload i {font-size:15px; margin:0;}
.qv-chat details.qv-figure {display:inline-block; vertical-align:top; margin:2px 6px 2px 0;}
.qv-chat details.qv-figure summary {list-style:none; cursor:zoom-in;}
.qv-chat details.qv-figure summary::-webkit-details-marker {display:none;}
.qv-chat details.qv-figure[open] summary {cursor:zoom-out;}
.qv-chat .qv-thumb {max-width:96px; max-height:96px; display:block;}
.qv-chat .qv-large {max-width:640px; display:block; margin-top:4px; border:1px solid #ccc;}
.qv-chat .qv-caption {font-size:11px; color:#555; max-width:160px;}
.qv-chat .qv-actions button {font-size:11px; height:22px; line-height:20px;}
.qv-chat.qv-over {outline:2px dashed #1976d2; outline-offset:2px;}
"""


# Drag-and-drop and paste of images: ipywidgets has no drop zone, and its FileUpload keeps its file input out of
# reach. So the widget's style block carries a one-time installer (an image that fails to load runs it, since
# innerHTML runs no <script>): files dropped on the widget or pasted into it are read in the browser and handed,
# one by one as JSON {name, data (base64)}, to a hidden Text widget (.qv-drop-sink) that the kernel observes.
_DROP_SCRIPT = (
    "const root=this.closest('.qv-chat');if(!root||root.dataset.qvDrop)return;root.dataset.qvDrop='1';"
    "let n=0;const send=files=>{for(const file of files){if(!/^(image|video)\\//.test(file.type))continue;"
    "const reader=new FileReader();reader.onload=()=>{const box=root.querySelector('.qv-drop-sink input');"
    "if(!box)return;box.value=JSON.stringify({name:file.name||('pasted-'+(++n)+'.png'),"
    "data:String(reader.result).split(',')[1],at:Date.now()+'-'+(++n)});"
    "box.dispatchEvent(new Event('change',{bubbles:true}))};reader.readAsDataURL(file)}};"
    "root.addEventListener('dragover',e=>{if(e.dataTransfer&&[...e.dataTransfer.types].includes('Files'))"
    "{e.preventDefault();root.classList.add('qv-over')}});"
    "root.addEventListener('dragleave',e=>{if(e.target===root)root.classList.remove('qv-over')});"
    "root.addEventListener('drop',e=>{root.classList.remove('qv-over');if(e.dataTransfer&&e.dataTransfer.files.length)"
    "{e.preventDefault();e.stopPropagation();send(e.dataTransfer.files)}});"
    "root.addEventListener('paste',e=>{const items=e.clipboardData?[...e.clipboardData.items]:[];"
    "const files=items.filter(x=>x.kind==='file').map(x=>x.getAsFile()).filter(Boolean);"
    "if(files.length){e.preventDefault();e.stopPropagation();send(files)}});"
)


def style_html() -> str:
    """The widget's style sheet, and the drag-and-drop / paste installer (see _DROP_SCRIPT)."""
    return (f"<style>{STYLE}</style><img src='data:,' alt='' style='display:none' "
            f"onerror=\"{html.escape(_DROP_SCRIPT)}\">")
