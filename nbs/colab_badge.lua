-- Puts an "Open in Colab" badge at the top of every page rendered from a notebook, so no chapter author has to
-- remember one. Quarto runs it for the site (listed under `filters:` in _quarto.yml); tools/site_preview.py runs
-- the same file through pandoc for the offline preview.
--
-- The link is the `colab-url` metadata (set in _quarto.yml) plus the notebook's file name, e.g.
-- https://colab.research.google.com/github/vishwamai/vishwamai/blob/main/nbs/00_config.ipynb
-- The badge is an inline SVG, so it shows without fetching an image from the network.

local BADGE_SVG = [[
<svg xmlns="http://www.w3.org/2000/svg" width="117" height="20" role="img" aria-label="Open in Colab">
<rect width="117" height="20" rx="3" fill="#555"/>
<rect x="52" width="65" height="20" rx="3" fill="#F9AB00"/>
<rect x="52" width="6" height="20" fill="#F9AB00"/>
<g font-family="Verdana,DejaVu Sans,sans-serif" font-size="11" text-anchor="middle">
<text x="26" y="14" fill="#fff">Open in</text>
<text x="84.5" y="14" fill="#222">Colab</text>
</g>
</svg>]]

-- The notebook being rendered: Quarto names it in quarto.doc.input_file, plain pandoc in PANDOC_STATE.
local function input_file()
  if quarto ~= nil and quarto.doc ~= nil and quarto.doc.input_file ~= nil then return quarto.doc.input_file end
  return PANDOC_STATE.input_files[1]
end

-- The page's Colab link, or nil when the page is not rendered to HTML from a notebook.
local function colab_href(meta)
  if not FORMAT:match("html") then return nil end  -- the Markdown and README renders stay badge-free
  local path = input_file()
  if path == nil or not path:match("%.ipynb$") or meta["colab-url"] == nil then return nil end
  return pandoc.utils.stringify(meta["colab-url"]):gsub("/$", "") .. "/" .. path:match("([^/\\]+)$")
end

local href, linked = nil, false

return {
  -- First pass: does the page already link to its own notebook on Colab (as the front page does, for the README)?
  { Meta = function(meta) href = colab_href(meta) end },
  { Link = function(link) if href ~= nil and link.target == href then linked = true end end },
  -- Second pass: if not, put the badge first in the body, right under the title block.
  { Pandoc = function(doc)
      if href == nil or linked then return nil end
      local badge = '<p class="colab-badge"><a href="' .. href .. '">' .. BADGE_SVG .. '</a></p>'
      doc.blocks:insert(1, pandoc.RawBlock("html", badge))
      return doc
    end },
}
