/**
 * Text normalisation in front of CLIP's BPE, as the slow transformers CLIPTokenizer does it when ftfy is installed:
 * `whitespace_clean(ftfy.fix_text(text)).lower()`.
 *
 * ftfy (6.3) cannot be ported whole. `fixText` implements this subset of its default `fix_text`, in ftfy's order,
 * repeated until the text stops changing (as ftfy's `fix_and_explain` loop does), one line at a time:
 *  - unescape_html="auto": HTML entities are decoded only while no `<` has been seen (a line containing `<` turns it
 *    off for that line and the rest of the text). Named entities: the HTML 4 set plus `&apos;` and the all-caps
 *    variants ftfy accepts (`&EACUTE;`), i.e. ftfy's table restricted to those names; numeric references as Python's
 *    `html.unescape` decodes them (Windows-1252 for 0x80-0x9F, U+FFFD for invalid ones).
 *  - fix_c1_controls: U+0080-U+009F read as Windows-1252 (undefined bytes kept).
 *  - fix_latin_ligatures: ﬁ ﬂ ﬀ ﬃ ﬄ ﬅ ﬆ Ĳ ĳ ŉ Ǳ-ǌ spelt out.
 *  - fix_character_width: NFKC of each U+FF01-U+FFEF (full/half-width forms), U+3000 -> space.
 *  - uncurl_quotes: U+02BC, U+2018-U+201B -> ', U+201C-U+201F -> ".
 *  - fix_line_breaks: CRLF, CR, U+2028, U+2029, U+0085 -> LF.
 *  - fix_surrogates: lone surrogates -> U+FFFD.
 *  - remove_terminal_escapes: ANSI `ESC[...x` sequences.
 *  - remove_control_chars: U+0000-0008, 000B, 000E-001F, 007F, 206A-206F, FEFF, FFF9-FFFC.
 *  - NFC normalisation.
 * NOT implemented: fix_encoding (mojibake repair such as "cafÃ©" -> "café": needs ftfy's badness heuristics and
 * codec tables), and named HTML5-only entities such as `&checkmark;` (left as is).
 */

/** ftfy's entity table restricted to HTML 4 names (+ apos) and their ftfy all-caps variants: name=hex[+hex]. */
const ENTITY_DATA =
  'AACUTE=c1 Aacute=c1 aacute=e1 ACIRC=c2 Acirc=c2 acirc=e2 ACUTE=b4 acute=b4 AELIG=c6 AElig=c6 aelig=e6 AGRAVE=c0 ' +
  'Agrave=c0 agrave=e0 ALEFSYM=2135 alefsym=2135 ALPHA=391 Alpha=391 alpha=3b1 AMP=26 amp=26 AND=2227 And=2a53 ' +
  'and=2227 ANG=2220 ang=2220 APOS=27 apos=27 ARING=c5 Aring=c5 aring=e5 ASYMP=2248 asymp=2248 ATILDE=c3 Atilde=c3 ' +
  'atilde=e3 AUML=c4 Auml=c4 auml=e4 BDQUO=201e bdquo=201e BETA=392 Beta=392 beta=3b2 BRVBAR=a6 brvbar=a6 BULL=2022 ' +
  'bull=2022 CAP=2229 Cap=22d2 cap=2229 CCEDIL=c7 Ccedil=c7 ccedil=e7 CEDIL=b8 cedil=b8 CENT=a2 cent=a2 CHI=3a7 ' +
  'Chi=3a7 chi=3c7 CIRC=2c6 circ=2c6 CLUBS=2663 clubs=2663 CONG=2245 cong=2245 COPY=a9 copy=a9 CRARR=21b5 ' +
  'crarr=21b5 CUP=222a Cup=22d3 cup=222a CURREN=a4 curren=a4 DAGGER=2020 Dagger=2021 dagger=2020 DARR=2193 ' +
  'Darr=21a1 dArr=21d3 darr=2193 DEG=b0 deg=b0 DELTA=394 Delta=394 delta=3b4 DIAMS=2666 diams=2666 DIVIDE=f7 ' +
  'divide=f7 EACUTE=c9 Eacute=c9 eacute=e9 ECIRC=ca Ecirc=ca ecirc=ea EGRAVE=c8 Egrave=c8 egrave=e8 EMPTY=2205 ' +
  'empty=2205 EMSP=2003 emsp=2003 ENSP=2002 ensp=2002 EPSILON=395 Epsilon=395 epsilon=3b5 EQUIV=2261 equiv=2261 ' +
  'ETA=397 Eta=397 eta=3b7 ETH=d0 eth=f0 EUML=cb Euml=cb euml=eb EURO=20ac euro=20ac EXIST=2203 exist=2203 FNOF=191 ' +
  'fnof=192 FORALL=2200 ForAll=2200 forall=2200 FRAC12=bd frac12=bd FRAC14=bc frac14=bc FRAC34=be frac34=be ' +
  'FRASL=2044 frasl=2044 GAMMA=393 Gamma=393 gamma=3b3 GE=2265 gE=2267 ge=2265 GT=3e Gt=226b gt=3e HARR=2194 ' +
  'hArr=21d4 harr=2194 HEARTS=2665 hearts=2665 HELLIP=2026 hellip=2026 IACUTE=cd Iacute=cd iacute=ed ICIRC=ce ' +
  'Icirc=ce icirc=ee IEXCL=a1 iexcl=a1 IGRAVE=cc Igrave=cc igrave=ec IMAGE=2111 image=2111 INFIN=221e infin=221e ' +
  'INT=222b Int=222c int=222b IOTA=399 Iota=399 iota=3b9 IQUEST=bf iquest=bf ISIN=2208 isin=2208 IUML=cf Iuml=cf ' +
  'iuml=ef KAPPA=39a Kappa=39a kappa=3ba LAMBDA=39b Lambda=39b lambda=3bb LANG=27e8 Lang=27ea lang=27e8 LAQUO=ab ' +
  'laquo=ab LARR=2190 Larr=219e lArr=21d0 larr=2190 LCEIL=2308 lceil=2308 LDQUO=201c ldquo=201c LE=2264 lE=2266 ' +
  'le=2264 LFLOOR=230a lfloor=230a LOWAST=2217 lowast=2217 LOZ=25ca loz=25ca LRM=200e lrm=200e LSAQUO=2039 ' +
  'lsaquo=2039 LSQUO=2018 lsquo=2018 LT=3c Lt=226a lt=3c MACR=af macr=af MDASH=2014 mdash=2014 MICRO=39c micro=b5 ' +
  'MIDDOT=b7 middot=b7 MINUS=2212 minus=2212 MU=39c Mu=39c mu=3bc NABLA=2207 nabla=2207 NBSP=a0 nbsp=a0 NDASH=2013 ' +
  'ndash=2013 NE=2260 ne=2260 NI=220b ni=220b NOT=ac Not=2aec not=ac NOTIN=2209 notin=2209 NSUB=2284 nsub=2284 ' +
  'NTILDE=d1 Ntilde=d1 ntilde=f1 NU=39d Nu=39d nu=3bd OACUTE=d3 Oacute=d3 oacute=f3 OCIRC=d4 Ocirc=d4 ocirc=f4 ' +
  'OELIG=152 OElig=152 oelig=153 OGRAVE=d2 Ograve=d2 ograve=f2 OLINE=203e oline=203e OMEGA=3a9 Omega=3a9 omega=3c9 ' +
  'OMICRON=39f Omicron=39f omicron=3bf OPLUS=2295 oplus=2295 OR=2228 Or=2a54 or=2228 ORDF=aa ordf=aa ORDM=ba ' +
  'ordm=ba OSLASH=d8 Oslash=d8 oslash=f8 OTILDE=d5 Otilde=d5 otilde=f5 OTIMES=2297 Otimes=2a37 otimes=2297 OUML=d6 ' +
  'Ouml=d6 ouml=f6 PARA=b6 para=b6 PART=2202 part=2202 PERMIL=2030 permil=2030 PERP=22a5 perp=22a5 PHI=3a6 Phi=3a6 ' +
  'phi=3c6 PI=3a0 Pi=3a0 pi=3c0 PIV=3a0 piv=3d6 PLUSMN=b1 plusmn=b1 POUND=a3 pound=a3 PRIME=2032 Prime=2033 ' +
  'prime=2032 PROD=220f prod=220f PROP=221d prop=221d PSI=3a8 Psi=3a8 psi=3c8 QUOT=22 quot=22 RADIC=221a radic=221a ' +
  'RANG=27e9 Rang=27eb rang=27e9 RAQUO=bb raquo=bb RARR=2192 Rarr=21a0 rArr=21d2 rarr=2192 RCEIL=2309 rceil=2309 ' +
  'RDQUO=201d rdquo=201d REAL=211c real=211c REG=ae reg=ae RFLOOR=230b rfloor=230b RHO=3a1 Rho=3a1 rho=3c1 RLM=200f ' +
  'rlm=200f RSAQUO=203a rsaquo=203a RSQUO=2019 rsquo=2019 SBQUO=201a sbquo=201a SCARON=160 Scaron=160 scaron=161 ' +
  'SDOT=22c5 sdot=22c5 SECT=a7 sect=a7 SHY=ad shy=ad SIGMA=3a3 Sigma=3a3 sigma=3c3 SIGMAF=3a3 sigmaf=3c2 SIM=223c ' +
  'sim=223c SPADES=2660 spades=2660 SUB=2282 Sub=22d0 sub=2282 SUBE=2286 subE=2ac5 sube=2286 SUM=2211 Sum=2211 ' +
  'sum=2211 SUP=2283 Sup=22d1 sup=2283 SUP1=b9 sup1=b9 SUP2=b2 sup2=b2 SUP3=b3 sup3=b3 SUPE=2287 supE=2ac6 ' +
  'supe=2287 SZLIG=53+53 szlig=df TAU=3a4 Tau=3a4 tau=3c4 THERE4=2234 there4=2234 THETA=398 Theta=398 theta=3b8 ' +
  'THETASYM=398 thetasym=3d1 THINSP=2009 thinsp=2009 THORN=de thorn=fe TILDE=2dc Tilde=223c tilde=2dc TIMES=d7 ' +
  'times=d7 TRADE=2122 trade=2122 UACUTE=da Uacute=da uacute=fa UARR=2191 Uarr=219f uArr=21d1 uarr=2191 UCIRC=db ' +
  'Ucirc=db ucirc=fb UGRAVE=d9 Ugrave=d9 ugrave=f9 UML=a8 uml=a8 UPSIH=3d2 upsih=3d2 UPSILON=3a5 Upsilon=3a5 ' +
  'upsilon=3c5 UUML=dc Uuml=dc uuml=fc WEIERP=2118 weierp=2118 XI=39e Xi=39e xi=3be YACUTE=dd Yacute=dd yacute=fd ' +
  'YEN=a5 yen=a5 YUML=178 Yuml=178 yuml=ff ZETA=396 Zeta=396 zeta=3b6 ZWJ=200d zwj=200d ZWNJ=200c zwnj=200c ';

let entities: Map<string, string> | undefined;
function namedEntity(name: string): string | undefined {
  if (!entities) {
    entities = new Map();
    for (const item of ENTITY_DATA.trim().split(' ')) {
      const [key, cps] = item.split('=') as [string, string];
      entities.set(key, String.fromCodePoint(...cps.split('+').map((h) => parseInt(h, 16))));
    }
  }
  return entities.get(name);
}

/** Windows-1252 decoding of bytes 0x80-0x9F (the five undefined bytes map to themselves, as in WHATWG/Python). */
const CP1252_C1 =
  '\u20ac\u0081\u201a\u0192\u201e\u2026\u2020\u2021\u02c6\u2030\u0160\u2039\u0152\u008d\u017d\u008f' +
  '\u0090\u2018\u2019\u201c\u201d\u2022\u2013\u2014\u02dc\u2122\u0161\u203a\u0153\u009d\u017e\u0178';

/** Python's html.unescape for one numeric character reference value. */
function numericCharRef(n: number): string {
  if (n === 0) return '\ufffd';
  if (n === 0x0d) return '\r';
  if (n >= 0x80 && n <= 0x9f) return CP1252_C1[n - 0x80]!;
  if ((n >= 0xd800 && n <= 0xdfff) || n > 0x10ffff) return '\ufffd';
  if (
    (n >= 0x01 && n <= 0x08) ||
    n === 0x0b ||
    (n >= 0x0e && n <= 0x1f) ||
    n === 0x7f ||
    (n >= 0xfdd0 && n <= 0xfdef) ||
    (n & 0xfffe) === 0xfffe
  ) {
    return '';
  }
  return String.fromCodePoint(n);
}

const HTML_ENTITY_RE = /&#?[0-9A-Za-z]{1,24};/g;
/** ftfy.fixes.unescape_html: decode unambiguous entities (those ending in ';'); unknown ones stay as written. */
export function unescapeHtml(text: string): string {
  return text.replace(HTML_ENTITY_RE, (m) => {
    if (m[1] !== '#') return namedEntity(m.slice(1, -1)) ?? m;
    const dec = /^&#([0-9]+);$/.exec(m);
    const hex = /^&#[xX]([0-9a-fA-F]+);$/.exec(m);
    if (!dec && !hex) return m; // html.unescape would decode only a prefix: ftfy keeps the text
    const out = numericCharRef(dec ? parseInt(dec[1]!, 10) : parseInt(hex![1]!, 16));
    return out.includes(';') ? m : out;
  });
}

const LIGATURES: Record<string, string> = {
  '\u0132': 'IJ', '\u0133': 'ij', '\u0149': '\u02bcn', '\u01f1': 'DZ', '\u01f2': 'Dz', '\u01f3': 'dz',
  '\u01c4': 'D\u017d', '\u01c5': 'D\u017e', '\u01c6': 'd\u017e', '\u01c7': 'LJ', '\u01c8': 'Lj', '\u01c9': 'lj',
  '\u01ca': 'NJ', '\u01cb': 'Nj', '\u01cc': 'nj', '\ufb00': 'ff', '\ufb01': 'fi', '\ufb02': 'fl', '\ufb03': 'ffi',
  '\ufb04': 'ffl', '\ufb05': '\u017ft', '\ufb06': 'st',
};
const LIGATURE_RE = /[\u0132\u0133\u0149\u01c4-\u01cc\u01f1-\u01f3\ufb00-\ufb06]/g;
const WIDTH_RE = /[\u3000\uff01-\uffef]/g;
const C1_RE = /[\u0080-\u009f]/g;
const LONE_SURROGATE_RE = /[\ud800-\udfff]/gu; // with the u flag only unpaired surrogates match
const ANSI_RE = /\u001b\[[\p{Nd};]*[a-zA-Z]/gu;
const CONTROL_RE = /[\u0000-\u0008\u000b\u000e-\u001f\u007f\u206a-\u206f\ufeff\ufff9-\ufffc]/g;

/** One pass of ftfy's fixers over a segment (see the module comment for the subset). */
function fixOnce(text: string, unescape: boolean): string {
  let t = unescape ? unescapeHtml(text) : text;
  t = t.replace(C1_RE, (c) => CP1252_C1[c.charCodeAt(0) - 0x80]!);
  t = t.replace(LIGATURE_RE, (c) => LIGATURES[c]!);
  t = t.replace(WIDTH_RE, (c) => (c === '\u3000' ? ' ' : c.normalize('NFKC')));
  t = t.replace(/[\u02bc\u2018-\u201b]/g, "'").replace(/[\u201c-\u201f]/g, '"');
  t = t.replace(/\r\n|[\r\u2028\u2029\u0085]/g, '\n');
  t = t.replace(LONE_SURROGATE_RE, '\ufffd');
  t = t.replace(ANSI_RE, '');
  t = t.replace(CONTROL_RE, '');
  return t.normalize('NFC');
}

/** Our port of ftfy.fix_text (documented subset above): line by line, each line fixed until stable. */
export function fixText(text: string): string {
  let unescape = true;
  let out = '';
  for (let pos = 0; pos < text.length; ) {
    const nl = text.indexOf('\n', pos);
    const end = nl < 0 ? text.length : nl + 1;
    let segment = text.slice(pos, end);
    if (segment.includes('<')) unescape = false;
    for (;;) {
      const fixed = fixOnce(segment, unescape);
      if (fixed === segment) break;
      segment = fixed;
    }
    out += segment;
    pos = end;
  }
  return out;
}

/** transformers' whitespace_clean: every run of Unicode White_Space (the `regex` module's \s) -> one space, trimmed. */
export function whitespaceClean(text: string): string {
  return text.replace(/\p{White_Space}+/gu, ' ').replace(/^ | $/g, '');
}

/** The full CLIP normalisation: whitespace_clean(fix_text(text)).lower(). */
export function clipNormalize(text: string): string {
  return whitespaceClean(fixText(text)).toLowerCase();
}
