"""The pages' stylesheet and script, served by the aggregator as files of their own (its
Content-Security-Policy allows no inline style or script)."""
