"""bnlab.report: turning experiment summaries into tables, plots and pages (lab layer)."""
