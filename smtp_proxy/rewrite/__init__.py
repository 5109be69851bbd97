"""Each recipient's copy of a message: MIME structure kept byte for byte, tracked links and the
pixel, opt-outs, submission headers, the ESP's correlation headers and DKIM."""
